"""The embedded worlds: bundled, trained models that everything falls back to offline.

- ``shapes-sd3``: a tiny text-to-image model of the SD3 architecture over procedurally rendered shapes
  (a diffusers ``StableDiffusion3Pipeline`` folder, no T5: load with ``text_encoder_3=None, tokenizer_3=None``).
- ``shapes-clip``: the tiny transformers ``CLIPModel`` whose text tower is shapes-sd3's text encoder; also the
  differentiable ``shapes-clip`` reward.
- ``shapes-wan``: a tiny text-to-video model of the Wan architecture over clips of moving shapes (a diffusers
  ``WanPipeline`` folder), scored by the ``shapes-video`` verifier. Still weak: its colours are right and its
  shapes coherent, but too soft to pass the strict verifier more than 4% of the time (see README, "The bundled
  worlds").

``flowalign zoo build`` reproduces them from fixed seeds (:mod:`flowalign.zoo.build_shapes`,
:mod:`flowalign.zoo.build_shapes_wan`).
"""

from __future__ import annotations

import json
from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
NAMES = ("shapes-sd3", "shapes-clip", "shapes-wan")
PIPELINES = ("shapes-sd3", "shapes-wan")


def path(name: str) -> str:
    """The folder of a bundled artefact (raises a clear error when it is missing or unknown)."""
    if name not in NAMES:
        raise ValueError(f"Unknown bundled world {name!r}; choose one of {NAMES}.")
    p = WEIGHTS / name
    if not (p / "model_index.json").exists() and not (p / "config.json").exists():
        raise FileNotFoundError(f"The bundled {name!r} is missing at {p}; rebuild it with `flowalign zoo build "
                                f"--only {name}`.")
    return str(p)


def settings(name: str) -> dict:
    """flowalign's sampling settings stored beside a bundled pipeline (native size, CFG, text length)."""
    f = Path(path(name)) / "flowalign.json"
    return json.loads(f.read_text()) if f.exists() else {}


def load_pipeline(name: str):
    """Load a bundled pipeline with plain diffusers."""
    if name not in PIPELINES:
        raise ValueError(f"{name!r} is not a pipeline; load it with flowalign.rewards.load({name!r}).")
    if name == "shapes-wan":
        from diffusers import WanPipeline

        return WanPipeline.from_pretrained(path(name))
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(path(name), text_encoder_3=None, tokenizer_3=None)
