"""diffusers custom pipeline: Wan 2.1 sampled by flowalign (reward guidance, SDE samplers, trajectories).

Load with ``DiffusionPipeline.from_pretrained(path, custom_pipeline=flowalign.pipelines.custom_pipeline_path("wan"),
trust_remote_code=True)`` and call it with the stock arguments plus ``flowalign_guidance``, ``flowalign_sampler`` and
``flowalign_eta``. The class lives in :mod:`flowalign.pipelines.classes`.
"""

# One shared name in all of flowalign's folders: diffusers executes every local custom pipeline.py as the same module
# (diffusers_modules.local.pipeline) and then needs exactly one DiffusionPipeline subclass in it, so loading two
# families in one process must rebind this name, not add a second class.
from flowalign.pipelines.classes import FlowalignGuidedWanPipeline as FlowalignGuidedPipeline  # noqa: F401
