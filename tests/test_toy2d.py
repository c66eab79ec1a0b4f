"""The toy2d world: the bundled 2-D flow model, its samplers and the exact optimum p* ∝ p_base exp(r / beta)."""

import math
import os

import pytest
import torch
from conftest import gen

import flowalign as fa
from flowalign.models.toy2d import Toy2DModel
from flowalign.zoo import toy2d as T

SDE = ["flow-sde", "dance-sde", "cps"]


@pytest.fixture(scope="module")
def toy():
    return T.load_toy2d()


def test_bundled_weights_load(toy):
    assert os.path.getsize(T.WEIGHTS) < 1_000_000
    assert isinstance(toy, Toy2DModel) and toy.family == "toy2d"
    assert toy.class_names == list(T.CLASS_NAMES)
    assert fa.load_model(toy) is toy
    assert toy.sigmas(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert toy.noise(3, generator=gen(0)).shape == (3, 2)


# Measured over 8 seeds at n = 1500 (40 ODE steps): the model's V-statistic energy distance to fresh data is
# 0.004 / 0.002 / 0.002 on average (max 0.009) for 8gaussians / 2blobs / all, the same as between two data sets
# (0.004 / 0.002 / 0.003, max 0.011: the statistic's bias, about E|X-X'| * 2/n), while the initial noise is
# 0.23 / 0.36 / 0.03 away. The "all" union covers the noise's bulk, hence its small noise distance.
@pytest.mark.parametrize("name", ["8gaussians", "2blobs", "all"])
def test_ode_samples_match_the_data_mixture(toy, name):
    n = 1500
    traj = fa.sample(toy, [name] * n, num_steps=40, sampler="ode", generator=gen(1))
    assert traj.images.shape == (n, 2) and traj.latents.shape == (n, 41, 2) and traj.log_probs is None
    data = T.sample_data(name, n, gen(2))
    d_model = T.energy_distance(traj.images, data)
    d_noise = T.energy_distance(traj.latents[:, 0], data)
    assert d_model < 0.012, d_model
    assert d_noise > 4 * d_model, (d_noise, d_model)

    # and they sit on the modes: within 3 std of a component (data: 99%; model: 94-99%, the rest are the usual
    # flow-matching stragglers between modes)
    def on_modes(x):
        _, means, stds = T.mixture(name)
        return ((torch.cdist(x.double(), means) / stds).min(1).values < 3).double().mean().item()

    assert on_modes(traj.images) > 0.9 and on_modes(data) > 0.98
    assert on_modes(traj.images) > on_modes(traj.latents[:, 0])


def test_class_conditioning_and_cfg(toy):
    n = 800
    a = fa.sample(toy, ["8gaussians"] * n, num_steps=20, generator=gen(3)).images
    b = fa.sample(toy, ["4corners"] * n, num_steps=20, generator=gen(3)).images
    u = fa.sample(toy, [""] * n, num_steps=20, generator=gen(3)).images  # the null class learns the union
    assert T.energy_distance(a, b) > 0.1
    assert T.energy_distance(a, T.sample_data("8gaussians", n, gen(4))) < 0.02
    assert T.energy_distance(u, T.sample_data("all", n, gen(4))) < 0.02
    # CFG (scale > 1) sharpens the class: samples gain data log-density
    c = fa.sample(toy, ["8gaussians"] * n, num_steps=20, guidance_scale=3.0, generator=gen(3)).images
    assert T.log_p_data(c, "8gaussians").mean() > T.log_p_data(a, "8gaussians").mean()


def test_bad_prompts_and_sizes_are_clear_errors(toy):
    with pytest.raises(ValueError, match="Did you mean '8gaussians'"):
        toy.encode(["8gaussian"])
    with pytest.raises(ValueError, match="no image size"):
        fa.sample(toy, ["gaussian"], num_steps=2, height=64, width=64)
    with pytest.raises(ValueError, match="encoded without CFG"):
        toy.velocity(torch.zeros(1, 2), 0.5, toy.encode(["gaussian"]), guidance_scale=2.0)


@pytest.mark.parametrize("sampler", SDE)
def test_sde_samplers_on_policy_ratio_is_exactly_one(toy, sampler):
    for gs in (1.0, 2.0):
        traj = fa.sample(toy, ["8gaussians", "2blobs"], num_steps=8, sampler=sampler, guidance_scale=gs,
                         num_images_per_prompt=16, generator=gen(5))
        assert traj.log_probs.shape == (32, 8) and torch.isfinite(traj.log_probs).all()
        lp = fa.log_prob(toy, traj)
        assert (lp - traj.log_probs).abs().max().item() <= 1e-5
    ode = fa.sample(toy, ["4corners"] * 8, num_steps=6, generator=gen(6))
    sto = fa.sample(toy, ["4corners"] * 8, num_steps=6, sampler=sampler, eta=0.0, generator=gen(6))
    assert (ode.latents - sto.latents).abs().max().item() <= 1e-5


def test_flow_sde_samples_match_the_data(toy):
    traj = fa.sample(toy, ["8gaussians"] * 1000, num_steps=40, sampler="flow-sde", eta=0.5, generator=gen(7))
    assert T.energy_distance(traj.images, T.sample_data("8gaussians", 1000, gen(8))) < 0.02


def test_lora_trains_and_saves(toy, tmp_path):
    model = Toy2DModel.from_pretrained(T.WEIGHTS)
    model.add_lora(rank=4)
    trainable = [n for n, p in model.transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    # reward backpropagation through the sampler reaches every LoRA weight
    traj = fa.sample(model, ["gaussian"] * 8, num_steps=4, requires_grad=True, generator=gen(0))
    T.LinearReward((1.0, 0.0))(traj.images).mean().backward()
    assert all(p.grad is not None for p in model.transformer.parameters() if p.requires_grad)
    with torch.no_grad():
        for p in model.transformer.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.save_lora(tmp_path / "lora")
    assert any(f.endswith(".safetensors") for f in os.listdir(tmp_path / "lora"))
    model.save_pretrained(tmp_path / "full")
    merged = Toy2DModel.from_pretrained(tmp_path / "full")
    x, cond = torch.randn(16, 2, generator=gen(1)), model.encode(["gaussian"] * 16)
    with torch.no_grad():
        assert torch.allclose(model.velocity(x, 0.3, cond), merged.velocity(x, 0.3, cond), atol=1e-5)
        assert not torch.allclose(toy.velocity(x, 0.3, cond), merged.velocity(x, 0.3, cond), atol=1e-3)
    T.save_weights(merged, str(tmp_path / "w.safetensors"))
    again = T.load_toy2d(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(again.net.state_dict().values(), merged.net.state_dict().values()))


def test_rewards_take_points(toy):
    x = torch.randn(5, 2, generator=gen(0), requires_grad=True)
    lin, quad, mode = T.LinearReward((1.0, -2.0)), T.QuadraticReward((1.0, 0.0), scale=2.0), T.ModeReward()
    assert torch.allclose(lin(x), x[:, 0] - 2 * x[:, 1])
    assert torch.allclose(quad(x, ["8gaussians"] * 5), -((x - torch.tensor([1.0, 0.0])) ** 2).sum(-1))
    top = torch.tensor([[2.0, 0.0], [0.0, -2.0]])  # the first ring mode is rewarded, the 7th is not
    assert mode(top)[0] > 0.9 and mode(top)[1] < 0.01
    mode(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert isinstance(fa.rewards.load("toy2d-linear", a=[0.0, 1.0]), T.LinearReward)
    with pytest.raises(ValueError, match="points"):
        lin(torch.rand(2, 3, 8, 8))


# ---------------------------------------------------------------- p* against closed forms

M, S, BETA = torch.tensor([0.5, -0.3]), 0.7, 2.0  # a Gaussian base N(M, S^2 I)
GRID = T.Grid(lim=6.0, n=241)  # covers the base and p* by > 7 standard deviations


def _log_base(x):
    return -((x - M.to(x.dtype)) ** 2).sum(-1) / (2 * S**2)


def _closed_forms():
    a, c = torch.tensor([1.0, -0.5]), torch.tensor([1.0, 1.0])
    prec = 1 / S**2 + 1 / BETA
    return [
        (T.LinearReward(a), M + S**2 * a / BETA, S**2),  # N(m + s^2 a / beta, s^2 I)
        (T.QuadraticReward(c), (M / S**2 + c / BETA) / prec, 1 / prec),  # precision 1/s^2 + 1/beta
    ]


@pytest.mark.parametrize("case", [0, 1], ids=["linear", "quadratic"])
def test_optimal_density_matches_the_closed_form(case):
    reward, mean, var = _closed_forms()[case]
    p = T.optimal_density(_log_base, reward, BETA, GRID)
    assert p.shape == (241, 241) and abs(p.sum().item() - 1) < 1e-9
    m, cov = T.grid_mean_cov(p, GRID)
    # a Riemann sum of a smooth Gaussian on a 0.05 grid: mean and covariance exact to ~1e-8
    assert torch.allclose(m, mean.double(), atol=1e-4), (m, mean)
    assert torch.allclose(cov, var * torch.eye(2, dtype=torch.float64), atol=1e-4), (cov, var)
    # the exact Gaussian on the grid is the same density: KL ~ 0
    exact = torch.softmax(-((GRID.points - mean.double()) ** 2).sum(-1) / (2 * var), 0)
    assert T.kl_on_grid(p, exact) < 1e-6


@pytest.mark.parametrize("case", [0, 1], ids=["linear", "quadratic"])
def test_importance_weights_match_the_closed_form(case):
    reward, mean, var = _closed_forms()[case]
    x = M + S * torch.randn(100_000, 2, generator=gen(0))
    w = T.importance_weights(x, reward, BETA)
    assert abs(w.sum().item() - 1) < 1e-9 and T.effective_sample_size(w) > 50_000
    m, cov = T.weighted_mean_cov(x, w)
    # Monte Carlo error with ESS ~ 8e4: ~0.003 on the mean, ~0.003 on the covariance entries
    assert torch.allclose(m, mean.double(), atol=0.015), (m, mean)
    assert torch.allclose(cov, var * torch.eye(2, dtype=torch.float64), atol=0.015), (cov, var)
    # and sampling the grid p* agrees with the weighted base samples
    p = T.optimal_density(_log_base, reward, BETA, GRID)
    y = T.sample_from_grid(p, GRID, 20_000, gen(1))
    assert torch.allclose(weighted_mean := y.double().mean(0), mean.double(), atol=0.02), weighted_mean


def test_optimal_density_of_the_mixture_moves_mass_to_the_rewarded_modes():
    grid = T.Grid(lim=3.5, n=141)
    base = T.optimal_density(lambda x: T.log_p_data(x, "8gaussians"), torch.zeros(grid.n**2), 1.0, grid)
    assert T.kl_on_grid(base, torch.softmax(T.log_p_data(grid.points, "8gaussians"), 0)) < 1e-9
    reward = T.ModeReward(width=0.5, scale=1.0)
    near = (reward(grid.points.float()) > 0.5).reshape(grid.n, grid.n)
    masses = [T.optimal_density(lambda x: T.log_p_data(x, "8gaussians"), reward, beta, grid)[near].sum().item()
              for beta in (10.0, 1.0, 0.2)]
    assert masses[0] < masses[1] < masses[2]  # 3 of 8 modes: ~0.375 of the mass at beta = inf
    assert 0.3 < masses[0] < 0.45 and masses[2] > 0.95


# ---------------------------------------------------------------- distances and grids


def test_energy_distance_and_mmd():
    x = T.sample_data("gaussian", 1000, gen(0))
    assert T.energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert T.mmd(x, x) == pytest.approx(0.0, abs=1e-12)
    y = T.sample_data("gaussian", 1000, gen(1))
    assert T.energy_distance(x, y) < 0.01 and abs(T.energy_distance(x, y, unbiased=True)) < 0.005
    shifts = [T.energy_distance(x, y + torch.tensor([d, 0.0])) for d in (0.25, 0.5, 1.0)]
    assert 0.01 < shifts[0] < shifts[1] < shifts[2]
    mmds = [T.mmd(x, y + torch.tensor([d, 0.0])) for d in (0.0, 0.25, 1.0)]
    assert mmds[0] < mmds[1] < mmds[2]


def test_grid_density_and_sampling_round_trip():
    grid = T.Grid(lim=3.5, n=71)
    p = torch.softmax(T.log_p_data(grid.points, "2blobs"), 0).reshape(grid.n, grid.n)
    assert T.kl_on_grid(p, p) == pytest.approx(0.0, abs=1e-12)
    h = T.grid_density(T.sample_from_grid(p, grid, 50_000, gen(0)), grid)
    assert T.kl_on_grid(h, p) < 0.05
    h_data = T.grid_density(T.sample_data("2blobs", 50_000, gen(1)), grid)
    assert T.kl_on_grid(h_data, p) < 0.05  # the exact sampler and the exact density agree
    assert T.kl_on_grid(h_data, torch.softmax(T.log_p_data(grid.points, "4corners"), 0)) > 1.0


def test_ode_log_density_is_the_model_density(toy):
    grid = T.Grid(lim=3.0, n=41)
    lp = T.ode_log_density(toy, grid.points.float(), "gaussian", num_steps=8)  # Heun: 1.009 at 8 steps
    total = lp.double().exp().sum().item() * grid.cell_area
    assert abs(total - 1) < 0.03, total  # a normalised density
    p_model = torch.softmax(lp.double(), 0)
    p_data = torch.softmax(T.log_p_data(grid.points, "gaussian"), 0)
    assert T.kl_on_grid(p_data, p_model) < 0.03


def test_plot_writes_a_png(tmp_path):
    grid = T.Grid(lim=3.0, n=31)
    p = T.optimal_density(lambda x: T.log_p_data(x, "4corners"), T.LinearReward((1.0, 1.0)), 1.0, grid)
    path = tmp_path / "p.png"
    T.plot({"p*": T.sample_from_grid(p, grid, 200, gen(0))}, p, grid, path=str(path), title="p*")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_data_log_density_is_normalised():
    grid = T.Grid(lim=5.0, n=201)
    for name in T.CLASS_NAMES:
        total = T.log_p_data(grid.points, name).exp().sum().item() * grid.cell_area
        assert total == pytest.approx(1.0, abs=1e-4), name
    assert math.isfinite(T.log_p_data(torch.tensor([[50.0, 50.0]]), "8gaussians").item())
