"""Model adapters: one file per family, all fulfilling :class:`~flowalign.models.base.FlowModel`."""

from __future__ import annotations

import importlib
import json
import os

import torch

from flowalign.models.base import Conditioning, FlowModel

#: diffusers pipeline class name -> "module:Class" of the adapter
FAMILIES = {
    "StableDiffusion3Pipeline": "flowalign.models.sd3:SD3Model",
    "FluxPipeline": "flowalign.models.flux:FluxModel",
    "WanPipeline": "flowalign.models.wan:WanModel",
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _adapter_for(class_name: str):
    if class_name not in FAMILIES:
        raise ValueError(
            f"Unsupported pipeline class {class_name!r}; flowalign supports {sorted(FAMILIES)} "
            "(SD3/SD3.5, FLUX.1, Wan 2.1)."
        )
    mod, cls = FAMILIES[class_name].split(":")
    return getattr(importlib.import_module(mod), cls)


def _bundled(name: str):
    """(pipeline, flowalign settings) for a bundled name, or (None, None)."""
    from flowalign import zoo
    from flowalign.models import tiny

    if name in tiny.TINY:
        h, w, f = tiny.TINY_SIZES[name]
        return tiny.build(name), {"native_size": [h, w, f]}
    if name in zoo.PIPELINES:
        return zoo.load_pipeline(name), zoo.settings(name)
    return None, None


def bundled_names() -> list[str]:
    from flowalign.models import tiny

    return [*tiny.TINY, "shapes-sd3", "shapes-wan", "toy2d"]


def read_settings(directory: str) -> dict:
    """flowalign's settings saved beside a pipeline (``flowalign.json``), if any."""
    f = os.path.join(directory, "flowalign.json")
    if not os.path.exists(f):
        return {}
    with open(f) as fh:
        return json.load(fh)


def _is_toy2d_dir(path: str) -> bool:
    config = os.path.join(path, "config.json")
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "model_index.json")) or not os.path.exists(config):
        return False
    with open(config) as f:
        return json.load(f).get("_class_name") == "Toy2DVelocity"


def load_model(model, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               **pipeline_kwargs) -> FlowModel:
    """Wrap a model as a :class:`FlowModel`.

    Args:
        model: a bundled name (``tiny-sd3``, ``tiny-flux``, ``tiny-wan``, or a zoo world), a local diffusers
            pipeline directory, a hub id (downloaded by diffusers), an existing diffusers pipeline, or a
            FlowModel (returned as is).
        device, dtype: where and in which precision to run (``"bfloat16"``, ``torch.float16`` ...).
        pipeline_kwargs: passed to ``DiffusionPipeline.from_pretrained`` for directories and hub ids.
    """
    if isinstance(model, FlowModel):
        return model
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"Unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}.")
        dtype = _DTYPES[dtype]
    if isinstance(model, str) and model == "toy2d":
        from flowalign.zoo.toy2d import load_toy2d

        return load_toy2d(device=device, dtype=None if dtype == torch.float32 else dtype)
    if isinstance(model, str) and _is_toy2d_dir(model):  # a trained toy2d model (Toy2DModel.save_pretrained)
        from flowalign.models.toy2d import Toy2DModel

        return Toy2DModel.from_pretrained(model, device=device, dtype=None if dtype == torch.float32 else dtype
                                          ).configure(read_settings(model))
    settings = {}
    if isinstance(model, str):
        pipe, settings = _bundled(model)
        if pipe is None:
            pipe = _load_pipeline(model, dtype, **pipeline_kwargs)
            settings = read_settings(model) if os.path.isdir(model) else {}
    else:
        pipe = model
    # subclasses of the supported pipelines (e.g. flowalign's guided pipeline classes) use their base's adapter
    name = next((c.__name__ for c in type(pipe).__mro__ if c.__name__ in FAMILIES), type(pipe).__name__)
    adapter = _adapter_for(name)
    return adapter(pipe, device=device, dtype=dtype).configure(settings or {})


def _load_pipeline(path: str, dtype, **kwargs):
    from diffusers import DiffusionPipeline

    if os.path.isdir(path):
        index = os.path.join(path, "model_index.json")
        if not os.path.exists(index):
            raise FileNotFoundError(f"{path!r} is a directory but has no model_index.json: not a diffusers pipeline.")
        with open(index) as f:
            meta = json.load(f)
        _adapter_for(meta.get("_class_name", "?"))  # fail early on unsupported families, before loading weights
        for name, entry in meta.items():  # components saved as absent (e.g. SD3 without T5) load as None
            if isinstance(entry, list) and entry[:2] == [None, None]:
                kwargs.setdefault(name, None)
    elif os.path.sep in path and path.count("/") != 1 or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"No model directory at {path!r}.")
    elif "/" not in path:
        raise ValueError(
            f"Unknown model {path!r}: not a bundled name ({', '.join(bundled_names())}), "
            "a local diffusers directory, or a hub id like 'stabilityai/stable-diffusion-3.5-medium'."
        )
    if dtype is not None:
        kwargs.setdefault("torch_dtype", dtype)
    return DiffusionPipeline.from_pretrained(path, **kwargs)


__all__ = ["FlowModel", "Conditioning", "load_model", "FAMILIES", "bundled_names"]
