"""The reward contract, a name registry and weighted sums of rewards.

A reward maps pixels in [0, 1] — (B, C, H, W), or video (B, F, C, H, W) — and one prompt per sample to a
(B,) float32 tensor. Subclasses implement ``score(images, prompts)`` on (N, C, H, W); calling a reward
validates the inputs, folds video frames into the batch (a video scores the mean of its frames), and checks
that the output is finite with one score per sample, so a broken reward fails loudly, not by training on NaN.
"""

from __future__ import annotations

import difflib
import importlib

import torch
from torch import nn

from flowalign.utils import as_prompt_list

_REGISTRY: dict[str, type] = {}
#: name prefixes registered by modules outside flowalign.rewards, imported on first use
_LAZY = {"toy2d-": "flowalign.zoo.toy2d"}


def check_scores(scores, n: int, name: str) -> torch.Tensor:
    """Raise a clear error naming the reward unless ``scores`` is a finite (n,) tensor."""
    if not torch.is_tensor(scores):
        raise TypeError(f"Reward {name!r} returned {type(scores).__name__}; expected a ({n},) tensor.")
    if tuple(scores.shape) != (n,):
        raise ValueError(f"Reward {name!r} returned shape {tuple(scores.shape)}; expected ({n},).")
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(f"Reward {name!r} returned non-finite scores (NaN/inf) at batch indices {bad}.")
    return scores


class Reward(nn.Module):
    """Base class: subclasses set ``name``, ``differentiable``, ``space`` and implement ``score``.

    Rewards are frozen evaluators: they stay in eval mode (``train()`` is a no-op, so dropout in a reward head
    never turns on) and gradients reach only the input pixels. Non-differentiable rewards run under no_grad.
    """

    name: str = "reward"
    differentiable: bool = True
    space: str = "pixel"
    uses_prompts: bool = True  # False: prompts may be None (e.g. aesthetic, JPEG size)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement score(images, prompts) -> (N,).")

    def train(self, mode: bool = True):
        return super().train(False)

    def check_inputs(self, images, prompts) -> tuple[torch.Tensor, list[str]]:
        if not torch.is_tensor(images):
            raise TypeError(f"Reward {self.name!r}: images must be a tensor, got {type(images).__name__}.")
        if images.ndim not in (4, 5):
            raise ValueError(f"Reward {self.name!r}: images must be (B, C, H, W) or video (B, F, C, H, W), "
                             f"got shape {tuple(images.shape)}.")
        if images.shape[-3] != 3:
            raise ValueError(f"Reward {self.name!r}: expected 3 RGB channels in dim -3 (channels first), got "
                             f"shape {tuple(images.shape)}; permute channels-last images to channels-first.")
        if not images.is_floating_point():
            raise TypeError(f"Reward {self.name!r}: images must be float pixels in [0, 1], got "
                            f"{images.dtype} (divide uint8 images by 255).")
        return images, self.broadcast_prompts(prompts, images.shape[0], "images")

    def broadcast_prompts(self, prompts, b: int, what: str = "images") -> list[str]:
        """One prompt per sample: a single string is repeated; None is allowed when the reward ignores prompts."""
        if prompts is None and not self.uses_prompts:
            return [""] * b
        if prompts is None:
            raise ValueError(f"Reward {self.name!r} scores text-sample agreement: pass one prompt per sample.")
        if isinstance(prompts, str):
            prompts = [prompts] * b
        prompts = as_prompt_list(prompts)
        if len(prompts) != b:
            raise ValueError(f"Reward {self.name!r}: got {b} {what} but {len(prompts)} prompts; pass one "
                             "prompt per sample or a single string for all.")
        return prompts

    def forward(self, images: torch.Tensor, prompts: str | list[str] | None = None) -> torch.Tensor:
        """Score ``images`` against ``prompts``; returns (B,) float32 on the images' device."""
        images, prompts = self.check_inputs(images, prompts)
        if self.training:  # submodules are built in train mode; a reward must never score with dropout on
            self.eval()
        b = images.shape[0]
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.differentiable):
            if images.ndim == 5:
                f = images.shape[1]
                flat = images.reshape(b * f, *images.shape[2:])
                out = check_scores(self.score(flat, [p for p in prompts for _ in range(f)]), b * f, self.name)
                out = out.reshape(b, f).float().mean(1)
            else:
                out = check_scores(self.score(images, prompts), b, self.name)
        return out.float().to(images.device)


def register(name: str):
    """Class decorator: make a Reward loadable as ``flowalign.rewards.load(name)``."""

    def deco(cls):
        prev = _REGISTRY.get(name)
        if prev is not None and (prev.__module__, prev.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"Reward name {name!r} is already registered to "
                             f"{prev.__module__}.{prev.__qualname__}.")
        _REGISTRY[name] = cls
        if "name" not in cls.__dict__:
            cls.name = name
        return cls

    return deco


def available() -> list[str]:
    """Registered reward names."""
    return sorted(_REGISTRY)


def _import_path(path: str):
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"Reward import path {path!r} must look like 'package.module:Class'.")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"Cannot import module {module_name!r} for reward {path!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"Module {module_name!r} has no attribute {attr!r} (from reward path {path!r}).")
        obj = getattr(obj, part)
    return obj


def load(name_or_path, **kwargs) -> Reward:
    """A reward from a registered name (``available()``), a ``"package.module:Class"`` path or an instance."""
    if isinstance(name_or_path, Reward):
        if kwargs:
            raise TypeError(f"Got a built reward {name_or_path.name!r} and keywords {sorted(kwargs)}.")
        return name_or_path
    if not isinstance(name_or_path, str):
        raise TypeError(f"A reward is a name, a 'module:Class' path or a Reward; got {name_or_path!r}.")
    for prefix, module in _LAZY.items():
        if name_or_path.startswith(prefix) and name_or_path not in _REGISTRY:
            importlib.import_module(module)  # registers the names it defines
    if name_or_path.startswith("latent:"):  # a trained latent reward's run folder, e.g. "latent:runs/x"
        from flowalign.rewards.latent import load_latent_reward

        return load_latent_reward(name_or_path[len("latent:"):], **kwargs)
    if ":" in name_or_path:
        factory = _import_path(name_or_path)
    elif name_or_path in _REGISTRY:
        factory = _REGISTRY[name_or_path]
    else:
        close = difflib.get_close_matches(name_or_path, available(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown reward {name_or_path!r}.{hint} Registered rewards: "
                         f"{', '.join(available())}; or pass an import path 'package.module:Class'.")
    try:
        reward = factory(**kwargs)
    except TypeError as e:
        if not kwargs:
            raise
        raise TypeError(f"Reward {name_or_path!r} could not be built with the keywords {kwargs}: {e}") from e
    if not isinstance(reward, Reward):
        raise TypeError(f"{name_or_path!r} built a {type(reward).__name__}, not a flowalign.rewards.Reward; "
                        "subclass Reward and implement score(images, prompts).")
    return reward


class MultiReward(Reward):
    """Weighted sum of rewards, ``{reward or name: weight}``.

    ``last_scores`` keeps each component's raw (unweighted) (B,) scores from the last call, and ``scores()``
    returns them without summing, so multi-objective trainers can normalise advantages per reward.
    """

    name = "multi"

    def __init__(self, rewards: dict):
        super().__init__()
        if not rewards:
            raise ValueError("MultiReward needs at least one {reward: weight} entry.")
        self.components: dict[str, Reward] = {}
        self.weights: dict[str, float] = {}
        for i, (r, w) in enumerate(rewards.items()):
            r = load(r)
            if r.name in self.components:
                raise ValueError(f"Two rewards are named {r.name!r}; give one a distinct `.name` first.")
            self.components[r.name] = r
            self.weights[r.name] = float(w)
            self.add_module(f"reward{i}", r)  # so .to(device) moves every component
        spaces = {r.space for r in self.components.values()}
        if len(spaces) > 1:
            raise ValueError(f"Cannot sum rewards over different inputs: spaces {sorted(spaces)}.")
        self.space = spaces.pop()
        self.differentiable = all(r.differentiable for r in self.components.values())
        self.uses_prompts = any(r.uses_prompts for r in self.components.values())
        self.last_scores: dict[str, torch.Tensor] = {}

    def scores(self, images, prompts=None) -> dict[str, torch.Tensor]:
        """Each component's unweighted (B,) scores."""
        next(iter(self.components.values())).check_inputs(images, prompts)  # the components' own input rules
        return {n: r(images, prompts) for n, r in self.components.items()}

    def forward(self, images, prompts=None, weights: dict[str, float] | None = None) -> torch.Tensor:
        """Weighted total (B,); ``weights`` overrides some or all of the given weights, for this call only."""
        unknown = set(weights or {}) - set(self.weights)
        if unknown:
            raise ValueError(f"Unknown reward names in weights: {sorted(unknown)}; "
                             f"the rewards are {list(self.weights)}.")
        w = {**self.weights, **(weights or {})}
        self.last_scores = self.scores(images, prompts)
        return sum(w[n] * s for n, s in self.last_scores.items())
