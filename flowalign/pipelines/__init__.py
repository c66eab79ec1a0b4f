"""The diffusers plug-in: a guided pipeline over an existing pipe, and custom-pipeline folders.

- ``guided(pipe, guidance=..., sampler=...)`` -> :class:`GuidedPipeline`, called like the pipe.
- ``DiffusionPipeline.from_pretrained(path, custom_pipeline=custom_pipeline_path("sd3"), trust_remote_code=True)``
  -> a ``FlowalignGuidedSD3Pipeline`` taking ``flowalign_guidance``/``flowalign_sampler``/``flowalign_eta``
  (likewise ``"flux"`` and ``"wan"``); the classes are in :mod:`flowalign.pipelines.classes`.
"""

from __future__ import annotations

import os

from flowalign.pipelines.guided import GuidedPipeline, guided

#: family -> custom-pipeline folder name (under ``custom/``); pipeline class names are accepted too
_FOLDERS = {"sd3": "sd3", "flux": "flux", "wan": "wan", "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux",
            "WanPipeline": "wan"}
_CLASSES = ("FlowalignGuidedSD3Pipeline", "FlowalignGuidedFluxPipeline", "FlowalignGuidedWanPipeline")


def custom_pipeline_path(family: str) -> str:
    """The diffusers custom-pipeline folder for ``family`` (``"sd3"``, ``"flux"`` or ``"wan"``).

    Pass it as ``custom_pipeline=`` to ``DiffusionPipeline.from_pretrained`` together with
    ``trust_remote_code=True`` (diffusers asks for it before running any local ``pipeline.py``).
    """
    key = family.lower() if family.lower() in ("sd3", "flux", "wan") else family
    if key not in _FOLDERS:
        raise ValueError(f"Unknown family {family!r}; choose one of ['sd3', 'flux', 'wan'].")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "custom", _FOLDERS[key])
    if not os.path.isfile(os.path.join(path, "pipeline.py")):
        raise FileNotFoundError(f"flowalign's custom pipeline file {os.path.join(path, 'pipeline.py')} is missing; "
                                "reinstall flowalign (the folder ships as package data).")
    return path


def __getattr__(name: str):
    # the diffusers subclasses import three pipeline modules: load them only when asked for
    if name in _CLASSES:
        from flowalign.pipelines import classes

        return getattr(classes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["GuidedPipeline", "guided", "custom_pipeline_path", *_CLASSES]
