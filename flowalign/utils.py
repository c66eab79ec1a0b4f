"""Small helpers shared across the package."""

from __future__ import annotations

import importlib
import os


def as_prompt_list(prompts) -> list[str]:
    """Accept one prompt or a list of prompts; reject anything else with a clear error."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
        return list(prompts)
    raise TypeError(f"prompts must be a string or a non-empty list of strings, got {type(prompts).__name__}.")


def require(module: str, extra: str):
    """Import an optional dependency, or fail naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module!r} is needed for this feature; install it with `pip install 'flowalign[{extra}]'`."
        ) from e


def atomic_save(obj, path) -> None:
    """``torch.save`` to ``path`` through a temporary file, so a killed process never leaves a half-written one."""
    import torch

    torch.save(obj, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
