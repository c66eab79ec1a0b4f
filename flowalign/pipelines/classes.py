"""diffusers pipeline classes whose ``__call__`` samples with flowalign: the custom-pipeline route.

``FlowalignGuidedSD3Pipeline``, ``FlowalignGuidedFluxPipeline`` and ``FlowalignGuidedWanPipeline`` subclass the stock
pipelines (same components, same ``from_pretrained``/``save_pretrained``) and route ``__call__`` through
:class:`~flowalign.pipelines.GuidedPipeline`, with three extra keyword arguments::

    pipe = DiffusionPipeline.from_pretrained(path, custom_pipeline=fa.pipelines.custom_pipeline_path("sd3"),
                                             trust_remote_code=True)
    out = pipe("a red circle", flowalign_guidance=guide, flowalign_sampler="flow-sde", flowalign_eta=0.7)

or, without diffusers' remote-code loading, ``FlowalignGuidedSD3Pipeline.from_pretrained(path)`` /
``FlowalignGuidedSD3Pipeline.from_pipe(pipe)``. Saved configs keep the stock class name, so a pipeline saved from
these classes loads with plain diffusers and :func:`flowalign.load_model`.
"""

from __future__ import annotations

import json

from diffusers import FluxPipeline, StableDiffusion3Pipeline, WanPipeline

from flowalign.pipelines.guided import GuidedPipeline, family_class

_UNPREFIXED = ("guidance", "sampler", "eta")


class _FlowalignCall:
    """The mixin: ``__call__`` through flowalign's sampler, the stock class name in saved configs."""

    def __call__(self, prompt=None, *, flowalign_guidance=None, flowalign_sampler: str = "ode",
                 flowalign_eta: float | None = None, **kwargs):
        """The stock pipeline's arguments (those :class:`GuidedPipeline` supports), plus:

        Args:
            flowalign_guidance: a guidance object (e.g. ``fa.guidance.RewardGuidance``) or None (no guidance: the
                output then equals the stock pipeline's with the ODE sampler).
            flowalign_sampler: ``"ode"``, ``"flow-sde"``, ``"dance-sde"`` or ``"cps"``.
            flowalign_eta: the SDE noise level (None: the sampler's default).

        The trajectory is returned as ``output.trajectory`` and kept as ``self.last_trajectory``.
        """
        clash = [k for k in _UNPREFIXED if k in kwargs]
        if clash:
            raise TypeError(f"{type(self).__name__} takes flowalign's options with a prefix: use "
                            f"{['flowalign_' + k for k in clash]} instead of {clash}.")
        return self.flowalign_pipeline(prompt, guidance=flowalign_guidance, sampler=flowalign_sampler,
                                       eta=flowalign_eta, **kwargs)

    @property
    def flowalign_pipeline(self) -> GuidedPipeline:
        """The :class:`GuidedPipeline` over this pipe (made once; it follows later scheduler swaps)."""
        runner = self.__dict__.get("_flowalign_pipeline")
        if runner is None:
            runner = GuidedPipeline(self)
            self.__dict__["_flowalign_pipeline"] = runner
        return runner

    @property
    def last_trajectory(self):
        """The :class:`~flowalign.sampling.Trajectory` of the last call (None before the first)."""
        runner = self.__dict__.get("_flowalign_pipeline")
        return None if runner is None else runner.last_trajectory

    def to_json_string(self) -> str:
        # save under the stock class name, so the folder loads without this code (and with flowalign.load_model)
        config = json.loads(super().to_json_string())
        config["_class_name"] = family_class(self).__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"


class FlowalignGuidedSD3Pipeline(_FlowalignCall, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` sampled by flowalign (``flowalign_guidance``/``_sampler``/``_eta``)."""


class FlowalignGuidedFluxPipeline(_FlowalignCall, FluxPipeline):
    """``FluxPipeline`` sampled by flowalign (``flowalign_guidance``/``_sampler``/``_eta``)."""


class FlowalignGuidedWanPipeline(_FlowalignCall, WanPipeline):
    """``WanPipeline`` sampled by flowalign (``flowalign_guidance``/``_sampler``/``_eta``)."""


#: family name -> class
CLASSES = {"sd3": FlowalignGuidedSD3Pipeline, "flux": FlowalignGuidedFluxPipeline, "wan": FlowalignGuidedWanPipeline}
