"""A guided pipeline over an existing diffusers pipe: called like the pipe, sampled by flowalign.

``guided(pipe, guidance=..., sampler=...)`` wraps a ``StableDiffusion3Pipeline``, ``FluxPipeline`` or
``WanPipeline`` (or a subclass, or a :class:`~flowalign.models.FlowModel`). Calling it takes the pipe's own
arguments (``prompt``, ``num_inference_steps``, ``guidance_scale``, ``height`` ...), runs
:func:`flowalign.sample` (any step rule, optional reward-gradient guidance) and returns what the pipe returns
(``StableDiffusion3PipelineOutput`` / ``FluxPipelineOutput`` images, ``WanPipelineOutput`` frames, in the same
``output_type`` layouts). With ``guidance=None`` and the ODE sampler the output equals the pipe's own, because
flowalign's Euler ODE is the pipelines' FlowMatch Euler loop (tested to 1e-4). One exception: a Wan pipe with the
released checkpoints' ``UniPCMultistepScheduler`` is sampled with FlowMatch Euler at the same shift (see
:mod:`flowalign.models.wan`), close to but not equal to the pipe's UniPC output.

The sampled :class:`~flowalign.sampling.Trajectory` (every state, sigmas, per-step log-probs for the SDE
samplers) is kept as ``output.trajectory`` and ``guided_pipe.last_trajectory``, for RL users.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from flowalign.models import FAMILIES, FlowModel, load_model
from flowalign.models import _adapter_for as _adapter_for_class_name
from flowalign.sampling.sampler import SAMPLERS, Trajectory, sample
from flowalign.utils import as_prompt_list

#: "not given": distinguishes an explicit ``guidance=None`` (switch guidance off for this call) from no override
_UNSET: Any = object()

#: arguments every family accepts (besides the flowalign overrides)
COMMON_ARGS = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "height", "width",
               "num_frames", "num_images_per_prompt", "generator", "output_type", "return_dict", "latents",
               "max_sequence_length")
#: per-family arguments of the pipe's own ``__call__`` that the guided pipeline also implements
FAMILY_ARGS = {"StableDiffusion3Pipeline": (), "FluxPipeline": ("true_cfg_scale",),
               "WanPipeline": ("num_videos_per_prompt",)}
OVERRIDES = ("guidance", "sampler", "eta")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def family_class(pipe) -> type:
    """The supported diffusers pipeline class that ``pipe`` is (or derives from)."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in FAMILIES:
            return cls
    raise ValueError(f"Unsupported pipeline class {type(pipe).__name__!r}; the guided pipeline supports "
                     f"{sorted(FAMILIES)} and their subclasses (SD3/SD3.5, FLUX.1, Wan 2.1).")


def _flow_model(pipe) -> FlowModel:
    """The FlowModel adapter of a pipe, found through its class hierarchy (so subclasses work too)."""
    return _adapter_for_class_name(family_class(pipe).__name__)(pipe)


def _call_defaults(cls: type) -> dict[str, Any]:
    """The defaults of the pipeline class's own ``__call__`` (read, not copied, so they stay true)."""
    params = inspect.signature(cls.__call__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


class GuidedPipeline:
    """A diffusers-style pipeline that samples with flowalign (guidance, SDE samplers, trajectories).

    Args:
        pipe: a ``StableDiffusion3Pipeline``, ``FluxPipeline``, ``WanPipeline`` (or subclass), a
            :class:`~flowalign.models.FlowModel` (its native size and CFG defaults are then used), or anything
            :func:`flowalign.load_model` accepts.
        guidance: a guidance object (e.g. :class:`~flowalign.sampling.guidance.RewardGuidance`) or None.
        sampler: ``"ode"`` (the pipelines' Euler; equal to the pipe's output without guidance), ``"flow-sde"``,
            ``"dance-sde"`` or ``"cps"``.
        eta: the SDE noise level (None: the sampler's default).

    Each of ``guidance``, ``sampler`` and ``eta`` can be overridden per call. Other attributes (``.scheduler``,
    ``.transformer``, ``.vae`` ...) are the pipe's; ``.to(...)`` moves the pipe and returns this wrapper.

    Example::

        guide = fa.guidance.RewardGuidance({"pickscore": 1.0}, scale=2.0)
        gpipe = fa.pipelines.guided(pipe, guidance=guide)
        image = gpipe("a red circle", num_inference_steps=28).images[0]
        traj = gpipe.last_trajectory       # latents, sigmas, log-probs
    """

    _OWN = frozenset({"pipe", "guidance", "sampler", "eta", "last_trajectory", "_model", "_scheduler_seen",
                      "_family", "_defaults"})

    def __init__(self, pipe, guidance=None, sampler: str = "ode", eta: float | None = None):
        if isinstance(pipe, FlowModel):
            model = pipe
        elif isinstance(pipe, str):
            model = load_model(pipe)
        else:
            model = _flow_model(pipe)
        _check_sampler(sampler, eta)
        self.pipe = model.pipe
        self._family = family_class(self.pipe)
        self._defaults = _call_defaults(self._family)
        self._model = model
        self._scheduler_seen = model.pipe.scheduler
        self.guidance = guidance
        self.sampler = sampler
        self.eta = eta
        self.last_trajectory: Trajectory | None = None

    # ----------------------------------------------------------------- the pipe's attributes
    def __getattr__(self, name: str):
        # only called when normal lookup fails; never recurse while the instance is half-built (copy, pickle)
        if name.startswith("__") or name in GuidedPipeline._OWN:
            raise AttributeError(name)
        if "pipe" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["pipe"], name)

    def __setattr__(self, name: str, value) -> None:
        if name in GuidedPipeline._OWN or "pipe" not in self.__dict__:
            object.__setattr__(self, name, value)
        else:
            setattr(self.pipe, name, value)  # e.g. ``gpipe.scheduler = ...`` changes the pipe, as one expects

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(dir(self.pipe)))

    def to(self, *args, **kwargs) -> GuidedPipeline:
        """Move the wrapped pipe (``pipe.to``) and return this wrapper."""
        self.pipe.to(*args, **kwargs)
        return self

    @property
    def model(self) -> FlowModel:
        """The :class:`FlowModel` sampling the pipe (rebuilt when the pipe's scheduler was replaced)."""
        if self.pipe.scheduler is not self._scheduler_seen:
            old = self._model
            new = type(old)(self.pipe)
            new.configure(old.settings())
            for attr in ("max_sequence_length", "true_cfg_scale"):
                if hasattr(old, attr):
                    setattr(new, attr, getattr(old, attr))
            self._model, self._scheduler_seen = new, self.pipe.scheduler
        return self._model

    @property
    def supported_arguments(self) -> list[str]:
        """The keyword arguments ``__call__`` accepts for this pipe's family."""
        return [*COMMON_ARGS, *FAMILY_ARGS[self._family.__name__], *OVERRIDES]

    def __repr__(self) -> str:
        return (f"GuidedPipeline({type(self.pipe).__name__}, sampler={self.sampler!r}, eta={self.eta}, "
                f"guidance={self.guidance!r})")

    # ----------------------------------------------------------------- calling
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_images_per_prompt: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str | None = None,
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
        guidance=_UNSET,
        sampler: str | None = None,
        eta: float | None = _UNSET,
        **kwargs,
    ):
        """Sample like the pipe's ``__call__``; see the class docstring.

        Defaults follow the wrapped pipe's own: ``num_inference_steps`` and ``output_type`` are read from its
        ``__call__`` signature (SD3/FLUX 28 steps and ``"pil"``, Wan 50 steps and ``"np"``); ``guidance_scale``,
        ``height``, ``width``, ``num_frames`` and ``max_sequence_length`` from the FlowModel (the pipe's defaults,
        or a bundled model's native ones). ``latents`` are in the pipe's layout (FLUX: packed).
        FLUX also takes ``true_cfg_scale``; Wan takes ``num_videos_per_prompt`` as the pipe does.

        Returns:
            The pipe's output class (``.images`` or ``.frames``), with the trajectory as ``.trajectory``; or a
            1-tuple with ``return_dict=False``.
        """
        family = self._family.__name__
        extra = self._family_kwargs(kwargs, family)
        if prompt is None:
            raise ValueError("prompt is required: the guided pipeline encodes prompts itself (prompt_embeds are not "
                             "supported).")
        prompts = as_prompt_list(prompt)
        d = self._defaults
        steps = int(d.get("num_inference_steps", 28) if num_inference_steps is None else num_inference_steps)
        output_type = d.get("output_type", "pil") if output_type is None else output_type
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}.")
        k = extra.pop("num_videos_per_prompt", None)
        if k is not None and num_images_per_prompt is not None and k != num_images_per_prompt:
            raise ValueError("Give num_videos_per_prompt or num_images_per_prompt, not both.")
        k = int(num_images_per_prompt if num_images_per_prompt is not None else 1 if k is None else k)
        guidance = self.guidance if guidance is _UNSET else guidance
        sampler = self.sampler if sampler is None else sampler
        eta = self.eta if eta is _UNSET else eta
        _check_sampler(sampler, eta)

        model = self.model
        height, width, num_frames = model.resolve_size(height, width, num_frames)
        gs = model.guidance_or_default(guidance_scale)
        # the model's text length and FLUX true-CFG scale default to the pipe's (512/256 tokens, 1.0), or to a
        # FlowModel's own settings; an explicit argument overrides them for this call only
        old_msl = getattr(model, "max_sequence_length", None)
        if max_sequence_length is not None and old_msl is not None:
            model.max_sequence_length = int(max_sequence_length)
        try:
            cond = None
            if family == "FluxPipeline":
                cond = model.encode(prompts, guidance_scale=gs, negative_prompt=negative_prompt,
                                    true_cfg_scale=extra.pop("true_cfg_scale", None))
            if latents is not None:
                latents = self._unpack_latents(model, latents, height, width)
            traj = sample(model, prompts, num_steps=steps, sampler=sampler, eta=eta, guidance_scale=gs,
                          height=height, width=width, num_frames=num_frames, generator=generator,
                          guidance=guidance, num_images_per_prompt=k, latents=latents,
                          negative_prompt=negative_prompt, cond=cond, decode=output_type != "latent",
                          progress=not getattr(self.pipe, "_progress_bar_config", {}).get("disable", False))
        finally:
            if old_msl is not None:
                model.max_sequence_length = old_msl
        self.last_trajectory = traj
        out = self._postprocess(model, traj, output_type)
        if hasattr(self.pipe, "maybe_free_model_hooks"):
            self.pipe.maybe_free_model_hooks()
        if not return_dict:
            return (out,)
        result = self._output_class()(**{("frames" if model.is_video else "images"): out})
        result.trajectory = traj  # an attribute, not a field: tuple(result) stays the pipe's
        return result

    # ----------------------------------------------------------------- helpers
    def _family_kwargs(self, kwargs: dict, family: str) -> dict:
        allowed = FAMILY_ARGS[family]
        unknown = sorted(k for k in kwargs if k not in allowed)
        if unknown:
            pipe_args = set(inspect.signature(self._family.__call__).parameters)
            of_pipe = [k for k in unknown if k in pipe_args]
            hint = (f" {of_pipe} {'is an argument' if len(of_pipe) == 1 else 'are arguments'} of {family} that the "
                    "guided pipeline does not implement; call the pipe itself (`.pipe(...)`) for them."
                    if of_pipe else "")
            raise TypeError(f"GuidedPipeline over {family} got unexpected keyword argument(s) {unknown}; the "
                            f"supported ones are {self.supported_arguments}.{hint}")
        return dict(kwargs)

    def _output_class(self):
        name = self._family.__name__
        if name == "StableDiffusion3Pipeline":
            from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput

            return StableDiffusion3PipelineOutput
        if name == "FluxPipeline":
            from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

            return FluxPipelineOutput
        from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

        return WanPipelineOutput

    @staticmethod
    def _unpack_latents(model: FlowModel, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The pipe's ``latents`` layout -> flowalign's (FLUX's packed tokens are unpacked)."""
        if model.family == "flux" and latents.ndim == 3:
            _, _, h, w = model.latent_shape(1, height, width)
            return model.unpack(latents, h, w)
        return latents

    def _postprocess(self, model: FlowModel, traj: Trajectory, output_type: str):
        """The trajectory's result in the pipe's own output layout for ``output_type``."""
        if output_type == "latent":
            x0 = traj.x0
            if model.family == "flux":
                x0 = model.pack(x0.contiguous())
            # the dtype the pipe's loop keeps its latents in: Wan fp32, SD3/FLUX the prompt embeddings' dtype
            dtype = torch.float32 if model.is_video else traj.cond.cond["encoder_hidden_states"].dtype
            return x0.to(dtype)
        vae_dtype = self.pipe.vae.dtype
        pixels = traj.images.to(vae_dtype)  # already in [0, 1], so no denormalisation below
        if model.is_video:
            # postprocess_video reads (B, C, F, H, W), the VAE's layout
            video = pixels.permute(0, 2, 1, 3, 4)
            return self.pipe.video_processor.postprocess_video(video, output_type=output_type,
                                                               do_denormalize=[False] * video.shape[2])
        return self.pipe.image_processor.postprocess(pixels, output_type=output_type,
                                                     do_denormalize=[False] * pixels.shape[0])


def _check_sampler(sampler: str, eta) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}.")
    if eta is not None and eta is not _UNSET and float(eta) < 0:
        raise ValueError(f"eta must be >= 0 (eta = 0 gives the ODE), got {eta}.")


def guided(pipe, guidance=None, sampler: str = "ode", eta: float | None = None) -> GuidedPipeline:
    """Wrap a diffusers pipe (or FlowModel) as a :class:`GuidedPipeline` called like the pipe itself."""
    return GuidedPipeline(pipe, guidance=guidance, sampler=sampler, eta=eta)
