"""Trainers: recipes run by ``flowalign train CONFIG key=value ...``, one file per recipe.

- :mod:`flowalign.trainers.reward_model` (``task: reward-model``): distil a pixel reward into a noise-aware
  latent reward model (:class:`~flowalign.rewards.latent.LatentRewardNet` or
  :class:`~flowalign.rewards.latent.BackboneLatentReward`).

Recipe modules import heavy pieces lazily, so ``import flowalign.trainers`` is cheap.
"""

from flowalign.trainers.reward_model import RewardModelConfig, train_reward_model

#: ``task:`` key of a training YAML -> (config schema, "module:function" taking (config_path, overrides))
TASKS = {"reward-model": (RewardModelConfig, "flowalign.trainers.reward_model:main")}

__all__ = ["TASKS", "RewardModelConfig", "train_reward_model"]
