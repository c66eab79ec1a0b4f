"""The toy2d world: Gaussian-mixture data, a bundled 2-D flow model, analytic rewards and the exact optimum.

KL-regularised reward maximisation, ``max_p E_p[r] - beta KL(p || p_base)``, is solved by
``p*(x) ∝ p_base(x) exp(r(x) / beta)`` (e.g. Rafailov et al. 2023, eq. 4; Uehara et al. 2024). In two
dimensions p* can be computed exactly on a dense grid (:func:`optimal_density`) or estimated with importance
weights on base samples (:func:`importance_weights`), so an alignment algorithm run on the toy model can be
checked against the exact answer with :func:`energy_distance`, :func:`mmd` or :func:`kl_on_grid`.

- Data: named 2-D Gaussian mixtures (:data:`MIXTURES`), sampled by :func:`sample_data`, with the exact
  log-density :func:`log_p_data`. The class names are the model's "prompts"; ``"all"`` is their union and
  ``""`` the unconditional (null) class, which the model learns as the union too.
- Model: :func:`load_toy2d` gives the bundled :class:`~flowalign.models.toy2d.Toy2DModel`
  (``toy2d_model.safetensors``, made by :func:`train_toy2d`); :func:`ode_log_density` is its own log-density
  (instantaneous change of variables), the exact ``p_base`` of the model rather than of the data.
- Rewards take points ``(B, 2)`` (the "images" of toy2d), ``reward(points, prompts=None) -> (B,)``:
  :class:`LinearReward`, :class:`QuadraticReward`, :class:`ModeReward` (registered as ``toy2d-linear``,
  ``toy2d-quadratic``, ``toy2d-mode``).

``python -m flowalign.zoo.toy2d train`` rebuilds the bundled weights; ``python -m flowalign.zoo.toy2d plot``
writes ``benchmarks/results/toy2d_base.png`` (ODE samples of each class over the data density) and prints
the energy distances of the samples (and of the initial noise) to the data.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from flowalign.models.toy2d import NULL_PROMPT, Toy2DModel, Toy2DVelocity
from flowalign.rewards.base import Reward, register

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy2d_model.safetensors")

# ------------------------------------------------------------------------------------------------ data law


def _ring(k: int, radius: float, std: float) -> list[tuple[float, tuple[float, float], float]]:
    return [(1.0 / k, (radius * math.cos(2 * math.pi * i / k), radius * math.sin(2 * math.pi * i / k)), std)
            for i in range(k)]


#: class name -> mixture components ``(weight, (mean_x, mean_y), std)`` (isotropic Gaussians)
MIXTURES: dict[str, list[tuple[float, tuple[float, float], float]]] = {
    "8gaussians": _ring(8, 2.0, 0.2),
    "4corners": [(0.25, (sx, sy), 0.25) for sx in (-1.0, 1.0) for sy in (-1.0, 1.0)],
    "2blobs": [(0.7, (-1.2, -0.6), 0.35), (0.3, (1.2, 0.6), 0.2)],
    "gaussian": [(1.0, (0.0, 0.0), 0.5)],
}
#: the model's class names ("prompts"): each mixture, and "all", their union with equal weights
CLASS_NAMES: tuple[str, ...] = (*MIXTURES, "all")


def mixture(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(weights (K,), means (K, 2), stds (K,))`` of a class; ``"all"`` and ``""`` are the union."""
    if name in ("all", NULL_PROMPT):
        comps = [(w / len(MIXTURES), m, s) for mix in MIXTURES.values() for w, m, s in mix]
    elif name in MIXTURES:
        comps = MIXTURES[name]
    else:
        raise ValueError(f"Unknown toy2d class {name!r}; choose one of {list(CLASS_NAMES)} or '' (the union).")
    w = torch.tensor([c[0] for c in comps], dtype=torch.float64)
    return w / w.sum(), torch.tensor([c[1] for c in comps], dtype=torch.float64), \
        torch.tensor([c[2] for c in comps], dtype=torch.float64)


def sample_data(name: str | Sequence[str], n: int | None = None, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Exact samples of the data law: ``n`` points of one class, or one point per name of a list. fp32 (N, 2)."""
    names = [name] * int(n) if isinstance(name, str) else list(name)
    out = torch.empty(len(names), 2, dtype=torch.float64)
    eps = torch.randn(len(names), 2, generator=generator, dtype=torch.float64)
    u = torch.rand(len(names), generator=generator, dtype=torch.float64)
    for cls in sorted(set(names)):
        rows = torch.tensor([i for i, c in enumerate(names) if c == cls])
        w, m, s = mixture(cls)
        k = torch.searchsorted(torch.cumsum(w, 0), u[rows]).clamp_max(len(w) - 1)
        out[rows] = m[k] + s[k, None] * eps[rows]
    return out.float()


def log_p_data(x: torch.Tensor, name: str) -> torch.Tensor:
    """Exact log-density of class ``name`` at points ``x`` (N, 2); differentiable, in x's dtype."""
    w, m, s = (t.to(x.device, x.dtype) for t in mixture(name))
    d2 = ((x[:, None, :] - m[None]) ** 2).sum(-1)  # (N, K)
    comp = -d2 / (2 * s**2) - 2 * torch.log(s) - math.log(2 * math.pi)
    return torch.logsumexp(comp + torch.log(w), dim=-1)


# ------------------------------------------------------------------------------------------------ rewards


class PointReward(Reward):
    """A reward on 2-D points ``(B, 2)``, the "images" of toy2d; prompts are accepted and ignored."""

    space = "point"
    uses_prompts = False
    differentiable = True

    def check_inputs(self, images, prompts):
        if not torch.is_tensor(images) or not images.is_floating_point():
            raise TypeError(f"Reward {self.name!r} takes float points (B, 2), got "
                            f"{getattr(images, 'dtype', type(images).__name__)}.")
        if images.ndim != 2 or images.shape[-1] != 2:
            raise ValueError(f"Reward {self.name!r} is a toy2d reward on points (B, 2); got shape "
                             f"{tuple(images.shape)}.")
        return images, self.broadcast_prompts(prompts, images.shape[0], "points")


def _vec(v, name: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32)
    if t.shape != (2,):
        raise ValueError(f"{name} must be a 2-vector, got {v!r}.")
    return t


@register("toy2d-linear")
class LinearReward(PointReward):
    """``r(x) = a . x``. With a Gaussian base N(m, s^2 I), ``p* = N(m + s^2 a / beta, s^2 I)``."""

    def __init__(self, a: Sequence[float] = (0.0, 1.0)):
        super().__init__()
        self.register_buffer("a", _vec(a, "a"))

    def score(self, points, prompts):
        return points.float() @ self.a.to(points.device)


@register("toy2d-quadratic")
class QuadraticReward(PointReward):
    """``r(x) = -scale |x - c|^2 / 2``. With a base N(m, s^2 I), p* is Gaussian with precision
    ``1/s^2 + scale/beta`` and mean ``(m/s^2 + scale c/beta) / (1/s^2 + scale/beta)``."""

    def __init__(self, center: Sequence[float] = (0.0, 0.0), scale: float = 1.0):
        super().__init__()
        self.register_buffer("center", _vec(center, "center"))
        self.scale = float(scale)

    def score(self, points, prompts):
        return -0.5 * self.scale * ((points.float() - self.center.to(points.device)) ** 2).sum(-1)


@register("toy2d-mode")
class ModeReward(PointReward):
    """``r(x) = scale * sum_k exp(-|x - c_k|^2 / (2 width^2))``: bounded bumps favouring chosen modes.

    ``centers`` defaults to the first three modes of the ring (``8gaussians``).
    """

    def __init__(self, centers: Sequence[Sequence[float]] | None = None, width: float = 0.5, scale: float = 1.0):
        super().__init__()
        if centers is None:
            centers = [m for _, m, _ in MIXTURES["8gaussians"][:3]]
        c = torch.as_tensor(centers, dtype=torch.float32)
        if c.ndim != 2 or c.shape[-1] != 2:
            raise ValueError(f"centers must be a list of 2-vectors, got {centers!r}.")
        self.register_buffer("centers", c)
        self.width, self.scale = float(width), float(scale)

    def score(self, points, prompts):
        d2 = ((points.float()[:, None] - self.centers.to(points.device)[None]) ** 2).sum(-1)
        return self.scale * torch.exp(-d2 / (2 * self.width**2)).sum(-1)


# ------------------------------------------------------------------------------------------------ model

#: the bundled network's architecture (also stored in the weight file's metadata)
NET_CONFIG = {"class_names": list(CLASS_NAMES), "hidden": 128, "num_layers": 3, "emb_dim": 64, "dim": 2}


def train_toy2d(steps: int = 4000, seed: int = 0, batch_size: int = 512, lr: float = 2e-3,
                cfg_dropout: float = 0.1, sigma_sampling: str = "logit-normal", ema_decay: float = 0.999,
                net_config: dict | None = None, log_every: int = 0) -> Toy2DModel:
    """Train the toy2d model by flow matching (rectified flow, Liu et al. 2023; Lipman et al. 2023).

    ``x_sigma = (1 - sigma) x0 + sigma eps`` with target ``eps - x0``; classes drawn uniformly from
    :data:`CLASS_NAMES`, replaced by the null class with probability ``cfg_dropout`` (classifier-free guidance,
    Ho & Salimans 2022); sigma uniform or logit-normal (SD3, Esser et al. 2024); AdamW with cosine decay; the
    returned model holds the EMA weights.
    """
    if sigma_sampling not in ("uniform", "logit-normal"):
        raise ValueError(f"sigma_sampling must be 'uniform' or 'logit-normal', got {sigma_sampling!r}.")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = Toy2DVelocity(**(net_config or NET_CONFIG)).train()
    names = list(net.config.class_names)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        labels = torch.randint(len(names), (batch_size,), generator=g)
        x0 = sample_data([names[i] for i in labels.tolist()], generator=g)
        labels = torch.where(torch.rand(batch_size, generator=g) < cfg_dropout, net.null_class, labels)
        eps = torch.randn(batch_size, 2, generator=g)
        if sigma_sampling == "uniform":
            sigma = torch.rand(batch_size, generator=g)
        else:
            sigma = torch.sigmoid(torch.randn(batch_size, generator=g))
        xs = (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
        loss = ((net(xs, sigma, labels) - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - d)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)
    return Toy2DModel(ema)


def save_weights(model: Toy2DModel, path: str = WEIGHTS) -> str:
    """Write the network as one safetensors file with its config in the metadata (the bundled format)."""
    from safetensors.torch import save_file

    net = model.merged_net()
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in net.config.items() if not k.startswith("_")}
    state = {k: v.detach().float().contiguous() for k, v in net.state_dict().items()}
    save_file(state, path, metadata={"config": json.dumps(cfg), "format": "flowalign-toy2d"})
    os.chmod(path, 0o644)  # safetensors writes 0600; a bundled file must be readable by everyone
    return path


def load_toy2d(path: str | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> Toy2DModel:
    """The bundled toy2d model (or one saved by :func:`save_weights` / ``Toy2DModel.save_pretrained``)."""
    path = path or WEIGHTS
    if path == WEIGHTS and not os.path.exists(path):
        raise FileNotFoundError(f"The bundled toy2d weights are missing ({path}); rebuild them with "
                                "`python -m flowalign.zoo.toy2d train`.")
    return Toy2DModel.from_pretrained(path, device=device, dtype=dtype)


def ode_log_density(model: Toy2DModel, points: torch.Tensor, prompt: str, num_steps: int = 32,
                    guidance_scale: float | None = None, method: str = "heun", batch_size: int = 8192) -> torch.Tensor:
    """The model's own log-density at ``points`` (N, 2), by the instantaneous change of variables.

    Integrates ``dx/dsigma = v`` from sigma = 0 to 1 on :meth:`model.sigmas` reversed, so that
    ``log p_0(x) = log N(x_1; 0, I) + int_0^1 div v(x_sigma, sigma) dsigma`` (Chen et al. 2018, FFJORD). The
    divergence is exact (two autograd passes in 2-D). ``method`` is ``"heun"`` (2nd order, two velocity calls a
    step) or ``"euler"``. This is the density of the continuous probability-flow ODE, which the Euler sampler
    approaches as its steps grow; it is ``p_base`` of the model itself rather than of the data.
    """
    if method not in ("heun", "euler"):
        raise ValueError(f"method must be 'heun' or 'euler', got {method!r}.")
    sig = model.sigmas(num_steps).flip(0)
    gs = model.guidance_or_default(guidance_scale)

    def field(x, s, cond):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            v = model.velocity(xg, s, cond, gs)
            div = sum(torch.autograd.grad(v[:, d].sum(), xg, retain_graph=d == 0)[0][:, d] for d in range(2))
        return v.detach(), div.detach()

    out = []
    for chunk in points.float().split(batch_size):
        cond = model.encode([prompt] * len(chunk), guidance_scale=gs)
        x = chunk.to(model.device)
        logdet = torch.zeros(len(x), device=model.device)
        for i in range(num_steps):
            h = sig[i + 1] - sig[i]
            v, div = field(x, sig[i], cond)
            if method == "heun":
                v2, div2 = field(x + h * v, sig[i + 1], cond)
                v, div = (v + v2) / 2, (div + div2) / 2
            x = x + h * v
            logdet = logdet + h * div
        out.append(-0.5 * (x**2).sum(-1) - math.log(2 * math.pi) + logdet)
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------ p* on a grid


@dataclass
class Grid:
    """A square grid of ``n x n`` cell centres over ``[-lim, lim]^2``.

    ``points`` is ``(n*n, 2)`` in row-major image order: ``points.view(n, n, 2)[i, j] = (xs[j], xs[i])``, so a
    density ``p.view(n, n)`` has rows along y (``imshow(p, origin="lower", extent=grid.extent)``).
    """

    lim: float = 4.0
    n: int = 161

    @property
    def xs(self) -> torch.Tensor:
        return torch.linspace(-self.lim, self.lim, self.n, dtype=torch.float64)

    @property
    def dx(self) -> float:
        return 2 * self.lim / (self.n - 1)

    @property
    def cell_area(self) -> float:
        return self.dx**2

    @property
    def points(self) -> torch.Tensor:
        yy, xx = torch.meshgrid(self.xs, self.xs, indexing="ij")
        return torch.stack([xx, yy], -1).reshape(-1, 2)

    @property
    def extent(self) -> tuple[float, float, float, float]:
        h = self.lim + self.dx / 2
        return (-h, h, -h, h)


def _on_grid(f, grid: Grid) -> torch.Tensor:
    """Evaluate a callable on the grid points (fp32 in, fp64 out), or take a precomputed (n*n,) / (n, n)."""
    if callable(f):
        with torch.no_grad():
            val = f(grid.points.float())
    else:
        val = torch.as_tensor(f)
    return val.detach().double().cpu().reshape(grid.n, grid.n)


def optimal_density(log_p_base: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor,
                    reward: Callable[..., torch.Tensor] | torch.Tensor, beta: float, grid: Grid | None = None
                    ) -> torch.Tensor:
    """``p*(x) ∝ p_base(x) exp(r(x) / beta)`` on a grid, as probability masses per cell ``(n, n)`` summing to 1.

    Args:
        log_p_base: ``points (N, 2) -> (N,)`` (e.g. ``lambda x: log_p_data(x, "8gaussians")`` or
            :func:`ode_log_density`), or its values on ``grid.points``.
        reward: ``points (N, 2) -> (N,)`` (a toy2d reward), or its values on the grid.
        beta: the KL coefficient (> 0); beta -> inf gives p_base.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}.")
    grid = grid or Grid()
    logits = _on_grid(log_p_base, grid) + _on_grid(reward, grid) / beta
    return torch.softmax(logits.flatten(), 0).reshape(grid.n, grid.n)


def importance_weights(samples: torch.Tensor, reward: Callable[..., torch.Tensor] | torch.Tensor, beta: float
                       ) -> torch.Tensor:
    """Self-normalised weights ``w_i ∝ exp(r(x_i) / beta)`` turning base samples into p* samples; (N,), sum 1."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}.")
    with torch.no_grad():
        r = reward(samples) if callable(reward) else torch.as_tensor(reward)
    return torch.softmax(r.double().flatten() / beta, 0)


def effective_sample_size(weights: torch.Tensor) -> float:
    """Kish's ESS ``1 / sum w^2`` of normalised weights."""
    return float(1.0 / (weights.double() ** 2).sum())


def weighted_mean_cov(points: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (2,) and covariance (2, 2) of weighted points (uniform weights if None), fp64."""
    x = points.double()
    w = torch.full((len(x),), 1.0 / len(x), dtype=torch.float64) if weights is None else weights.double()
    w = w / w.sum()
    mean = (w[:, None] * x).sum(0)
    d = x - mean
    return mean, (w[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0)


def grid_mean_cov(p: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of a grid density (masses per cell)."""
    return weighted_mean_cov(grid.points, p.flatten())


def grid_density(samples: torch.Tensor, grid: Grid | None = None) -> torch.Tensor:
    """Histogram of samples on the grid cells, as masses ``(n, n)`` summing to 1 (points outside are dropped)."""
    grid = grid or Grid()
    x = samples.detach().double().cpu()
    ij = torch.round((x + grid.lim) / grid.dx).long()
    inside = ((ij >= 0) & (ij < grid.n)).all(-1)
    if not bool(inside.any()):
        raise ValueError(f"No sample lies inside the grid [-{grid.lim}, {grid.lim}]^2.")
    flat = ij[inside, 1] * grid.n + ij[inside, 0]
    h = torch.bincount(flat, minlength=grid.n * grid.n).double()
    return (h / h.sum()).reshape(grid.n, grid.n)


def sample_from_grid(p: torch.Tensor, grid: Grid, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``n`` points from a grid density: a cell by its mass, then uniformly inside the cell. fp32 (n, 2)."""
    idx = torch.multinomial(p.flatten().double(), n, replacement=True, generator=generator)
    jitter = (torch.rand(n, 2, generator=generator, dtype=torch.float64) - 0.5) * grid.dx
    return (grid.points[idx] + jitter).float()


def kl_on_grid(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> float:
    """``KL(p || q) = sum p log(p / q)`` of two grid densities (masses; renormalised), in nats."""
    p = p.double().flatten() / p.sum()
    q = q.double().flatten() / q.sum()
    return float((p * (torch.log(p + eps) - torch.log(q + eps))).sum())


# ------------------------------------------------------------------------------------------------ distances


def energy_distance(x: torch.Tensor, y: torch.Tensor, unbiased: bool = False) -> float:
    """Squared energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (Szekely & Rizzo 2013) between sample sets.

    Zero iff the laws are equal. The default V-statistic is >= 0 and exactly 0 for ``x == y``; its bias for two
    independent samples of one law is about ``E|X-X'| (1/n + 1/m)``. ``unbiased=True`` drops the diagonals.
    """
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    dxy = torch.cdist(x, y).mean()

    def self_term(z):
        d = torch.cdist(z, z)
        n = len(z)
        return d.sum() / (n * (n - 1)) if unbiased else d.mean()

    return float(2 * dxy - self_term(x) - self_term(y))


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = (0.1, 0.3, 1.0)) -> float:
    """Squared maximum mean discrepancy (biased V-statistic) with a sum of Gaussian kernels (Gretton et al. 2012)."""
    x, y = x.detach().double().cpu(), y.detach().double().cpu()

    def k(a, b):
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * h**2)) for h in bandwidths).mean()

    return float(k(x, x) + k(y, y) - 2 * k(x, y))


# ------------------------------------------------------------------------------------------------ plots


def plot(samples: torch.Tensor | dict[str, torch.Tensor] | None = None, density: torch.Tensor | None = None,
         grid: Grid | None = None, path: str | None = None, title: str | None = None, ax=None):
    """Scatter points over a grid density heatmap (e.g. p*); writes a PNG when ``path`` is given.

    ``samples`` may be a dict ``{label: points}`` for several sets in different colours. Returns the axes.
    """
    import matplotlib

    if ax is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = grid or Grid()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if density is not None:
        d = density.detach().double().cpu().reshape(grid.n, grid.n)
        ax.imshow(d.numpy(), origin="lower", extent=grid.extent, cmap="Blues", interpolation="bilinear")
    if samples is not None:
        sets = samples if isinstance(samples, dict) else {None: samples}
        colors = ["tab:orange", "tab:red", "tab:green", "tab:purple", "k"]
        for (label, pts), c in zip(sets.items(), colors * 4):
            pts = pts.detach().float().cpu()
            ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, c=c, label=label, linewidths=0)
        if any(label is not None for label in sets):
            ax.legend(loc="upper right", fontsize=7, markerscale=4)
    ax.set_xlim(-grid.lim, grid.lim)
    ax.set_ylim(-grid.lim, grid.lim)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title, fontsize=9)
    if fig is not None:
        fig.tight_layout()
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            fig.savefig(path, dpi=120)
        plt.close(fig)
    return ax


def base_report(model: Toy2DModel | None = None, n: int = 2000, num_steps: int = 50, seed: int = 0,
                path: str | None = "benchmarks/results/toy2d_base.png") -> dict[str, dict[str, float]]:
    """ODE samples of every class against the data: energy distances (and of the initial noise), and a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flowalign.sampling import sample

    model = model or load_toy2d()
    grid = Grid(lim=3.5, n=141)
    names = list(model.class_names)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4))
    out = {}
    for i, name in enumerate(names):
        traj = sample(model, [name] * n, num_steps=num_steps, sampler="ode",
                      generator=torch.Generator().manual_seed(seed + i))
        data = sample_data(name, n, torch.Generator().manual_seed(1000 + seed + i))
        out[name] = {"ode_vs_data": energy_distance(traj.images, data),
                     "noise_vs_data": energy_distance(traj.latents[:, 0], data),
                     "data_vs_data": energy_distance(sample_data(name, n, torch.Generator().manual_seed(7 + i)), data)}
        density = torch.softmax(log_p_data(grid.points, name), 0)
        plot(traj.images, density, grid, ax=axes[i],
             title=f"{name}: ED(ODE, data) = {out[name]['ode_vs_data']:.4f}\n"
                   f"ED(noise, data) = {out[name]['noise_vs_data']:.3f}")
    if path:
        fig.suptitle(f"toy2d base model: {num_steps}-step ODE samples (orange) over the data density", fontsize=10)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flowalign.zoo.toy2d", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the toy2d model and write the bundled weights")
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=WEIGHTS)
    p = sub.add_parser("plot", help="plot ODE samples of the bundled model over the data and print distances")
    p.add_argument("--out", default="benchmarks/results/toy2d_base.png")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--num-steps", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.cmd == "train":
        t0 = time.perf_counter()
        model = train_toy2d(steps=args.steps, seed=args.seed, log_every=500)
        print(f"trained in {time.perf_counter() - t0:.1f} s; wrote {save_weights(model, args.out)}")
    else:
        res = base_report(n=args.n, num_steps=args.num_steps, path=args.out)
        for name, r in res.items():
            print(f"{name:>12}: " + "  ".join(f"{k} {v:.4f}" for k, v in r.items()))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
