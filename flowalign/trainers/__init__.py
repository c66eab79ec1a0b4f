"""Trainers: recipes run by ``flowalign train CONFIG key=value ...``, one file per recipe.

- :mod:`flowalign.trainers.grpo` (``task: grpo``): Flow-GRPO.
- :mod:`flowalign.trainers.euphonium` (``task: euphonium``): Flow-GRPO with process-reward-guided rollouts, dual
  (outcome + process) advantages and guidance distillation.
- :mod:`flowalign.trainers.crd` (``task: crd``): Centered Reward Distillation.
- :mod:`flowalign.trainers.d3po` (``task: d3po``): per-step DPO on same-noise trajectory pairs, preferences from
  rewards (Pareto dominance) or from human labels (``flowalign label``).
- :mod:`flowalign.trainers.dpo` (``task: dpo``) and :mod:`flowalign.trainers.rwr` (``task: rwr``): Flow-DPO on
  online or offline pairs, and reward-weighted regression.
- :mod:`flowalign.trainers.dmd` (``task: dmd`` / ``re-dmd``): distribution matching distillation into a
  few-step student, optionally reward-weighted (Re-DMD).
- :mod:`flowalign.trainers.flash_dmd` (``task: flash-dmd``): DMD on the high-noise steps, a GAN on the low-noise
  ones, a critic that tracks the student, and joint step-level DPO.
- :mod:`flowalign.trainers.rg_lcd` (``task: rg-lcd``): reward-guided latent consistency distillation.
- :mod:`flowalign.trainers.reward_model` (``task: reward-model``): distil a pixel reward into a noise-aware
  latent reward model (:class:`~flowalign.rewards.latent.LatentRewardNet` or
  :class:`~flowalign.rewards.latent.BackboneLatentReward`).

Generator trainers share :mod:`flowalign.trainers.loop`. Recipe modules import heavy pieces lazily, so
``import flowalign.trainers`` is cheap.
"""

from flowalign.trainers.crd import CRDConfig, train_crd
from flowalign.trainers.d3po import D3POConfig, train_d3po
from flowalign.trainers.dmd import DMDConfig, train_dmd
from flowalign.trainers.dpo import DPOConfig, train_dpo
from flowalign.trainers.euphonium import EuphoniumConfig, train_euphonium
from flowalign.trainers.flash_dmd import FlashDMDConfig, train_flash_dmd
from flowalign.trainers.grpo import GRPOConfig, train_grpo
from flowalign.trainers.reward_model import RewardModelConfig, train_reward_model
from flowalign.trainers.rg_lcd import RGLCDConfig, train_rg_lcd
from flowalign.trainers.rwr import RWRConfig, train_rwr

#: ``task:`` key of a training YAML -> (config schema, "module:function" taking (config_path, overrides))
TASKS = {
    "crd": (CRDConfig, "flowalign.trainers.crd:main"),
    "d3po": (D3POConfig, "flowalign.trainers.d3po:main"),
    "dmd": (DMDConfig, "flowalign.trainers.dmd:main"),
    "dpo": (DPOConfig, "flowalign.trainers.dpo:main"),
    "euphonium": (EuphoniumConfig, "flowalign.trainers.euphonium:main"),
    "flash-dmd": (FlashDMDConfig, "flowalign.trainers.flash_dmd:main"),
    "re-dmd": (DMDConfig, "flowalign.trainers.dmd:main"),
    "grpo": (GRPOConfig, "flowalign.trainers.grpo:main"),
    "reward-model": (RewardModelConfig, "flowalign.trainers.reward_model:main"),
    "rg-lcd": (RGLCDConfig, "flowalign.trainers.rg_lcd:main"),
    "rwr": (RWRConfig, "flowalign.trainers.rwr:main"),
}

__all__ = ["TASKS", "CRDConfig", "D3POConfig", "DMDConfig", "DPOConfig", "EuphoniumConfig", "FlashDMDConfig",
           "GRPOConfig", "RGLCDConfig", "RWRConfig", "RewardModelConfig", "train_crd", "train_d3po", "train_dmd",
           "train_dpo", "train_euphonium", "train_flash_dmd", "train_grpo", "train_reward_model", "train_rg_lcd",
           "train_rwr"]
