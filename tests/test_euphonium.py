"""Euphonium (task: euphonium): dual-reward maths, the GRPO special case, "it trains" (tiny SD3, toy2d)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import untrained_lora_parameters

import flowalign as fa
from flowalign.config import ConfigError, load_config
from flowalign.functional.euphonium import (
    dual_reward_ppo_loss,
    guidance_distillation_loss,
    process_advantages,
    process_step_scores,
)
from flowalign.functional.policy import ppo_clip_loss
from flowalign.rewards import Reward
from flowalign.trainers.euphonium import Euphonium, EuphoniumConfig, train_euphonium
from flowalign.trainers.grpo import GRPO, GRPOConfig
from flowalign.trainers.loop import Run


class Brightness(Reward):
    """Mean pixel value: a cheap differentiable pixel (process) reward for the tiny SD3."""

    name = "brightness"
    uses_prompts = False

    def score(self, images, prompts):
        return images.mean((1, 2, 3))


BRIGHTNESS = f"{__name__}:Brightness"


# ----------------------------------------------------------------------------- functional maths
def test_process_step_scores_forms():
    s = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, 7.0]])  # two samples, states x_0, x_1, x_2 (T = 2 steps)
    torch.testing.assert_close(process_step_scores(s, "next"), torch.tensor([[1.0, 3.0], [2.0, 7.0]]))
    torch.testing.assert_close(process_step_scores(s, "state"), torch.tensor([[0.0, 1.0], [2.0, 2.0]]))
    torch.testing.assert_close(process_step_scores(s, "delta"), torch.tensor([[1.0, 2.0], [0.0, 5.0]]))
    with pytest.raises(ValueError, match="next"):
        process_step_scores(s, "future")


def test_process_advantages_are_standardised_per_step_within_groups():
    # groups {0, 1, 2} and {3, 4, 5}; per-state scores chosen so each step's column is easy by hand
    s = torch.tensor([[0.0, 1.0, 0.0],
                      [0.0, 2.0, 0.0],
                      [0.0, 3.0, 6.0],
                      [0.0, 5.0, 1.0],
                      [0.0, 5.0, 1.0],
                      [0.0, 5.0, 4.0]])
    g = torch.tensor([7, 7, 7, 2, 2, 2])
    a = process_advantages(s, g, "next", clip=None, eps=1e-9)
    z = 1 / (2 / 3) ** 0.5  # (x - mean) / population std of (1, 2, 3) at the extremes
    torch.testing.assert_close(a[:3, 0], torch.tensor([-z, 0.0, z]))
    assert a[3:, 0].abs().max() == 0  # equal scores in a group: no advantage
    torch.testing.assert_close(a[:3, 1], torch.tensor([-2 ** -0.5, -2 ** -0.5, 2 ** 0.5]))  # (0, 0, 6)
    torch.testing.assert_close(a[3:, 1], torch.tensor([-2 ** -0.5, -2 ** -0.5, 2 ** 0.5]))  # (1, 1, 4)
    # "delta" standardises the change across each step; "state" the step's input (all-zero x_0: no advantage)
    torch.testing.assert_close(process_advantages(s, g, "delta", clip=None, eps=1e-9)[:3, 1],  # (-1, -2, 3)
                               torch.tensor([-1.0, -2.0, 3.0]) / (14 / 3) ** 0.5)
    assert process_advantages(s, g, "state")[:, 0].abs().max() == 0
    assert process_advantages(s * 100, g, "next", clip=1.0).abs().max() <= 1.0


def test_dual_reward_loss_is_the_weighted_sum_of_ppo_terms():
    torch.manual_seed(0)
    lp_old = torch.randn(6)
    lp = (lp_old + 0.01 * torch.randn(6)).requires_grad_(True)
    a1, a2, ap = torch.randn(6), torch.randn(6), torch.randn(6)
    loss, info = dual_reward_ppo_loss(lp, lp_old, {"r1": a1, "r2": a2}, {"r1": 1.0, "r2": 0.5}, clip_range=0.005,
                                      process_advantage=ap, outcome_coef=2.0, process_coef=0.3)
    ppo = [ppo_clip_loss(lp, lp_old, a, 0.005)[0] for a in (a1, a2, ap)]
    expected = 2.0 * 1.0 * ppo[0] + 2.0 * 0.5 * ppo[1] + 0.3 * ppo[2]
    torch.testing.assert_close(loss, expected)
    assert set(info) >= {"ora/r1", "ora/r2", "pra", "ratio_dev", "clip_frac"}
    # on policy the gradient is the policy gradient of the combined advantage
    lp0 = lp_old.clone().requires_grad_(True)
    dual_reward_ppo_loss(lp0, lp_old, {"r1": a1, "r2": a2}, {"r1": 1.0, "r2": 0.5}, 1e-4, ap, 2.0, 0.3)[0].backward()
    torch.testing.assert_close(lp0.grad, -(2.0 * a1 + 1.0 * a2 + 0.3 * ap) / 6)
    # one reward of weight 1 and no process term: bitwise Flow-GRPO's loss
    one, _ = dual_reward_ppo_loss(lp, lp_old, {"r": a1}, {"r": 1.0}, 0.005, ap, 1.0, 0.0)
    assert torch.equal(one, ppo_clip_loss(lp, lp_old, a1, 0.005)[0])


def test_guidance_distillation_loss_is_the_gaussian_kl_to_the_guided_step():
    mu, mu_g = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    std = torch.rand(3, 4) + 0.2
    loss = guidance_distillation_loss(mu, mu_g, std)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mu_g, std),
                                                 torch.distributions.Normal(mu, std)).mean(1)
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    torch.testing.assert_close(mu.grad, (mu - mu_g).detach() / std ** 2 / 4)
    assert mu_g.grad is None  # the guided mean is a fixed target
    assert guidance_distillation_loss(mu, mu.detach(), std).abs().max() == 0
    assert guidance_distillation_loss(mu, mu_g, torch.zeros(3, 4)).abs().max() == 0  # deterministic steps


def test_config_checks():
    with pytest.raises(ConfigError, match="outcome_rewards"):
        load_config(EuphoniumConfig, {"reward": "shapes-clip", "outcome_rewards": {"shapes-geneval": 1.0}})
    with pytest.raises(ConfigError, match="guide_window"):
        load_config(EuphoniumConfig, {"num_steps": 10, "guide_window": [8, 4]})
    with pytest.raises(ConfigError, match="distill_weight"):
        load_config(EuphoniumConfig, {"distill_weight": -1.0})
    with pytest.raises(ConfigError, match="process_advantage"):
        load_config(EuphoniumConfig, {"process_advantage": "future"})
    assert load_config(EuphoniumConfig, {"num_steps": 16, "guide_window": [-4, 16]}).guide_window == [-4, 16]
    for name in ("shapes", "toy2d", "sd35m", "flux"):
        cfg = load_config(EuphoniumConfig, Path(__file__).parents[1] / "configs" / "euphonium" / f"{name}.yaml")
        assert cfg.task == "euphonium"


def test_a_non_differentiable_process_reward_is_a_clear_error(tmp_path):
    cfg = _tiny(tmp_path, guide_scale=1.0)  # process reward defaults to the (non-differentiable) JPEG reward
    with pytest.raises(ValueError, match="process_rewards"):
        train_euphonium(cfg, model=fa.load_model("tiny-sd3"))


# ----------------------------------------------------------------------------- the trainer on tiny SD3
def _tiny(tmp_path, schema=EuphoniumConfig, **kw):
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    base = {"task": "grpo" if schema is GRPOConfig else "euphonium", "model": "tiny-sd3",
            "reward": "jpeg-compressibility", "prompts": str(tmp_path / "p.txt"), "eval_prompts": None, "epochs": 1,
            "groups_per_epoch": 2, "group_size": 2, "num_steps": 3, "rollout_batch_size": 4, "train_batch_size": 4,
            "lora_rank": 4, "out": str(tmp_path / "run"), "progress": False, "log_with": "none", "lr": 1e-2,
            "beta": 0.04, "clip_range": 1e-3}
    return load_config(schema, {**base, **kw})


def _epoch_grads(cfg, algorithm, perturb: bool = True):
    """One epoch of ``algorithm`` on a fresh tiny SD3 whose LoRA is set to fixed random values (so every gradient is
    non-zero; ``perturb=False`` keeps the fresh adapter, i.e. the policy equals the reference); returns the gradients
    of the first optimizer step, and the epoch's metrics."""
    run = Run(cfg, algorithm(cfg), model=fa.load_model("tiny-sd3"))
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in run.params if perturb else []:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    grads = []

    def step():
        if not grads:
            grads.extend(p.grad.clone() for p in run.params)
        run.optimizer.zero_grad(set_to_none=True)
        return 0.0

    run.optimizer_step = step
    shared, local = run.generators(0)
    return grads, run.algorithm.epoch(run, 0, shared, local)


def test_with_guidance_process_and_distillation_off_euphonium_is_grpo(tmp_path):
    ref, m_ref = _epoch_grads(_tiny(tmp_path, GRPOConfig), GRPO)
    # the guidance hook is in the sampler (a process reward is set) but at scale 0 it moves nothing
    off = {"process_rewards": {BRIGHTNESS: 1.0}, "guide_scale": 0.0, "process_weight": 0.0, "distill_weight": 0.0}
    got, m_got = _epoch_grads(_tiny(tmp_path, **off), Euphonium)
    assert len(got) == len(ref) > 0
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    for key in ("reward/mean", "train/loss", "train/kl"):
        assert m_got[key] == m_ref[key], key
    # and the comparison can fail: any one of guidance, process advantages or distillation changes the gradients
    for change in ({"guide_scale": 5.0}, {"process_weight": 1.0}, {"guide_scale": 5.0, "distill_weight": 1.0}):
        other, _ = _epoch_grads(_tiny(tmp_path, **{**off, **change}), Euphonium)
        assert not all(torch.equal(a, b) for a, b in zip(other, ref)), change


@pytest.mark.parametrize("guided_mean", [False, True])
def test_guided_rollouts_stay_exactly_on_policy(tmp_path, guided_mean):
    # log-probs recorded under the unguided mean (default) or the guided one are recomputed exactly
    cfg = _tiny(tmp_path, process_rewards={BRIGHTNESS: 1.0}, guide_scale=5.0, guide_normalize=True,
                log_prob_under_guided_mean=guided_mean)
    _, metrics = _epoch_grads(cfg, Euphonium)
    assert metrics["train/onpolicy_ratio_dev"] == 0.0
    assert metrics["guide/steps"] == 3 and metrics["train/distill"] > 0 and "train/pra_loss" in metrics


def test_distillation_targets_agree_while_the_policy_is_the_reference(tmp_path):
    # a fresh LoRA (B = 0) is the reference, so the guided reference mean and the guided rollout mean coincide
    kw = dict(process_rewards={BRIGHTNESS: 1.0}, guide_scale=5.0, guide_normalize=True, beta=0.0, process_weight=0.0)
    g_roll, m_roll = _epoch_grads(_tiny(tmp_path, distill_target="rollout", **kw), Euphonium, perturb=False)
    g_ref, m_ref = _epoch_grads(_tiny(tmp_path, distill_target="reference", **kw), Euphonium, perturb=False)
    assert m_roll["train/distill"] > 0
    torch.testing.assert_close(m_ref["train/distill"], m_roll["train/distill"], rtol=1e-5, atol=0)
    for a, b in zip(g_ref, g_roll):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # the drift weighting divides the same error by dt^2 instead of the step variance
    _, m_drift = _epoch_grads(_tiny(tmp_path, distill_weighting="drift", **kw), Euphonium, perturb=False)
    assert m_drift["train/distill"] > 0 and m_drift["train/distill"] != m_roll["train/distill"]


def test_training_changes_every_trainable_parameter(tmp_path):
    # two epochs: LoRA starts with B = 0, so A's first gradient is exactly zero
    cfg = _tiny(tmp_path, epochs=2, process_rewards={BRIGHTNESS: 1.0}, guide_scale=5.0, guide_normalize=True,
                outcome_rewards={"jpeg-compressibility": 1.0, BRIGHTNESS: 0.5})
    _, unchanged = untrained_lora_parameters(lambda: train_euphonium(cfg, model=fa.load_model("tiny-sd3")))
    assert not unchanged, f"parameters that did not train: {unchanged[:5]}"
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in ("train/loss", "train/pra_loss", "train/distill", f"reward/{BRIGHTNESS}", "process/score"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in rec), key
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").exists()


# ----------------------------------------------------------------------------- toy2d
def _toy(tmp_path, **kw):
    (tmp_path / "eval.txt").write_text("8gaussians\n" * 256)
    base = {"task": "euphonium", "model": "toy2d", "reward": "toy2d-linear", "prompts": "toy2d:8gaussians",
            "eval_prompts": str(tmp_path / "eval.txt"), "eval_num": 256, "eval_steps": 8, "eval_every": 0,
            "epochs": 12, "groups_per_epoch": 4, "group_size": 16, "num_steps": 8, "rollout_batch_size": 64,
            "train_batch_size": 64, "lora_rank": 8, "lr": 1e-3, "clip_range": 0.01, "beta": 0.0,
            "out": str(tmp_path / "run"), "save_every": 0, "progress": False, "log_with": "none",
            "process_rewards": {"toy2d-linear": 1.0}, "guide_scale": 1.0, "guide_beta": 0.25}
    return load_config(EuphoniumConfig, {**base, **kw})


def test_short_toy2d_run_raises_the_unguided_reward(tmp_path):
    summary = train_euphonium(_toy(tmp_path))
    before, after = summary["before"]["eval/toy2d-linear"], summary["after"]["eval/toy2d-linear"]
    assert after > before + 0.3, (before, after)  # unguided ODE samples of the trained policy, 256 held-out draws


def test_distillation_alone_internalises_the_guidance(tmp_path):
    # no reward advantage at all: only the regression of the unguided mean onto the guided one. The guidance drifts
    # upward (r = y), so the trained model, sampled without guidance, must move up too.
    summary = train_euphonium(_toy(tmp_path, outcome_weight=0.0, process_weight=0.0, distill_weight=1.0))
    before, after = summary["before"]["eval/toy2d-linear"], summary["after"]["eval/toy2d-linear"]
    assert after > before + 0.3, (before, after)
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rec[-1]["train/loss"] == 0 and rec[-1]["train/distill"] > 0
