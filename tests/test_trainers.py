"""Trainer maths and "it trains" checks for Flow-GRPO and CRD (tiny SD3 and toy2d, CPU)."""

import json

import pytest
import torch
from conftest import untrained_lora_parameters

from flowalign.config import load_config
from flowalign.functional.advantages import advantage_to_unit, group_advantages
from flowalign.functional.crd import adaptive_error, crd_loss, group_center, implicit_reward
from flowalign.functional.policy import gaussian_mean_kl, ppo_clip_loss
from flowalign.trainers.crd import CRDConfig, train_crd
from flowalign.trainers.grpo import GRPOConfig, sde_window, train_grpo
from flowalign.trainers.snapshot import DecaySchedule, Snapshot


# ----------------------------------------------------------------------------- functional maths
def test_group_advantages_match_per_group_standardisation():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0, 7.0])
    g = torch.tensor([0, 0, 0, 5, 5, 5, 9])  # ids need not be contiguous; group 9 is a singleton
    a = group_advantages(r, g, clip=None)
    for ids in ([0, 1, 2], [3, 4, 5]):
        x = r[ids]
        torch.testing.assert_close(a[ids], (x - x.mean()) / (x.std(unbiased=False) + 1e-4))
    assert a[6] == 0
    glob = group_advantages(r, g, global_std=True, clip=None)
    torch.testing.assert_close(glob[:3], (r[:3] - 2.0) / (r.std(unbiased=False) + 1e-4))
    assert group_advantages(torch.tensor([0.0, 100.0]), torch.tensor([0, 0]), clip=0.5).abs().max() == 0.5


def test_advantage_to_unit_range():
    u = advantage_to_unit(torch.tensor([-9.0, -5.0, 0.0, 5.0, 9.0]))
    torch.testing.assert_close(u, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_ppo_clip_loss_on_policy_gradient_is_policy_gradient():
    lp = torch.randn(6, requires_grad=True)
    adv = torch.randn(6)
    loss, info = ppo_clip_loss(lp, lp.detach(), adv, clip_range=1e-4)
    loss.backward()
    torch.testing.assert_close(lp.grad, -adv / 6)
    assert info["ratio_dev"] == 0


def test_ppo_clip_loss_clips_in_the_advantage_direction():
    old = torch.zeros(2)
    lp = torch.tensor([0.5, 0.5], requires_grad=True)  # ratio e^0.5 > 1 + eps
    loss, info = ppo_clip_loss(lp, old, torch.tensor([1.0, -1.0]), clip_range=0.1)
    loss.backward()
    # positive advantage: the clipped branch is the max, no gradient; negative advantage keeps the unclipped one
    assert lp.grad[0] == 0 and lp.grad[1] > 0
    assert info["clip_frac"] == 1


def test_gaussian_mean_kl_equals_torch_kl():
    mu, mu_ref = torch.randn(3, 4), torch.randn(3, 4)
    std = torch.rand(3, 4) + 0.1
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mu, std),
                                                 torch.distributions.Normal(mu_ref, std)).mean(1)
    torch.testing.assert_close(gaussian_mean_kl(mu, mu_ref, std), expected)
    assert gaussian_mean_kl(mu, mu_ref, torch.zeros(3, 4)).abs().max() == 0


def test_crd_pieces():
    v, u = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    assert implicit_reward(v, v, u).abs().max() == 0  # no better than the old snapshot
    better = u + 0.1 * (v - u)
    assert (implicit_reward(better, v, u) > 0).all()
    err = (v - u).flatten(1)
    torch.testing.assert_close(adaptive_error(v, u), (err ** 2).mean(1) / err.abs().mean(1))
    x, g = torch.randn(6), torch.tensor([0, 0, 0, 1, 1, 1])
    c = group_center(x, g)
    torch.testing.assert_close(c[:3].sum(), torch.tensor(0.0), atol=1e-6, rtol=0)
    # the loss is zero exactly when beta * centred implicit reward equals the centred external reward
    r01 = torch.tensor([0.2, 0.5, 0.8, 0.1, 0.6, 0.5])
    assert crd_loss(group_center(r01, g) / 2.0 + 7.0, r01, g, beta=2.0) < 1e-10
    assert crd_loss(torch.zeros(6), r01, g, beta=2.0) > 0


def test_decay_schedule_and_snapshot():
    s = DecaySchedule.parse("75-0.0-0.0075-0.999")
    assert s(0) == 0 and s(74) == 0 and s(75) == 0 and s(76) == pytest.approx(0.0075) and s(10 ** 6) == 0.999
    assert DecaySchedule.parse("0.9")(5) == 0.9
    with pytest.raises(ValueError, match="start-initial-rate-maximum"):
        DecaySchedule.parse("fast")
    p = torch.nn.Parameter(torch.zeros(3))
    snap = Snapshot([p])
    with torch.no_grad():
        p.fill_(1.0)
    snap.update(0.25)
    torch.testing.assert_close(snap.values[0], torch.full((3,), 0.75))
    with snap.swapped_in():
        assert p.detach().eq(0.75).all()
    assert p.detach().eq(1.0).all()


def test_shapes_training_prompts_follow_the_base_category_mix():
    # uniform over unique captions would be ~80% position prompts, which the base almost never passes
    from collections import Counter

    from flowalign.trainers.data import categories_of, load_prompts

    for split in ("train", "test"):
        prompts = load_prompts(f"shapes-{split}")
        share = {c: n / len(prompts) for c, n in Counter(categories_of(prompts)).items()}
        assert abs(share["single"] - 0.2) < 0.03 and abs(share["position"] - 0.25) < 0.03, share
        assert prompts == load_prompts(f"shapes-{split}")  # a fixed draw


def test_sde_window_is_inside_the_leading_range():
    cfg = load_config(GRPOConfig, {"num_steps": 10, "sde_window_size": 2, "sde_window_range": 0.5})
    starts = {sde_window(cfg, torch.Generator().manual_seed(i))[0] for i in range(50)}
    assert starts <= set(range(0, 5)) and len(starts) > 1  # the window starts within the first half


# ----------------------------------------------------------------------------- it trains
def _tiny(tmp_path, schema, **kw):
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    base = {"model": "tiny-sd3", "reward": "jpeg-compressibility", "prompts": str(tmp_path / "p.txt"),
            "eval_prompts": None, "epochs": 1, "groups_per_epoch": 2, "group_size": 2, "num_steps": 3,
            "rollout_batch_size": 4, "train_batch_size": 4, "lora_rank": 4, "out": str(tmp_path / "run"),
            "progress": False, "log_with": "none", "lr": 1e-2}
    return load_config(schema, {**base, **kw})


@pytest.mark.parametrize("schema,train", [(GRPOConfig, train_grpo), (CRDConfig, train_crd)])
def test_training_changes_every_trainable_parameter(tmp_path, schema, train):
    import flowalign as fa

    # two optimizer steps: LoRA starts with B = 0, so A's first gradient is exactly zero
    cfg = _tiny(tmp_path, schema, task=schema.__dataclass_fields__["task"].default, epochs=2)
    model = fa.load_model("tiny-sd3")
    _, unchanged = untrained_lora_parameters(lambda: train(cfg, model=model))
    assert not unchanged, f"parameters that did not train: {unchanged[:5]}"
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [v for r in rec for k, v in r.items() if k.startswith("train/") and "loss" in k]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert (tmp_path / "run" / "report.md").exists()


@pytest.mark.parametrize("same_noise", [True, False])
def test_grpo_same_noise_groups_branch_at_the_first_stochastic_step(tmp_path, monkeypatch, same_noise):
    from flowalign.trainers.loop import Run

    rollouts, rollout = [], Run.rollout

    def recording_rollout(self, *args, **kwargs):
        rollouts.append(rollout(self, *args, **kwargs))
        return rollouts[-1]

    monkeypatch.setattr(Run, "rollout", recording_rollout)
    cfg = _tiny(tmp_path, GRPOConfig, task="grpo", num_steps=4, sde_window_size=2, sde_window_range=1.0,
                same_noise=same_noise)
    train_grpo(cfg)
    traj = rollouts[0]
    first = int(traj.stochastic.nonzero()[0])
    x = traj.latents.view(2, 2, *traj.latents.shape[1:])  # (group, member, T + 1, ...)
    shared = [bool(torch.equal(x[g, 0, : first + 1], x[g, 1, : first + 1])) for g in range(2)]
    assert shared == [same_noise] * 2
    assert not any(torch.equal(x[g, 0, first + 1], x[g, 1, first + 1]) for g in range(2))


def test_lr_schedule_sets_each_epochs_learning_rate(tmp_path):
    cfg = _tiny(tmp_path, GRPOConfig, task="grpo", epochs=3, lr_schedule="linear", lr_final=0.2)
    train_grpo(cfg)
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/lr"] for r in rec] == pytest.approx([1e-2, 0.6e-2, 0.2e-2])


def test_grpo_recomputed_log_probs_are_on_policy(tmp_path):
    cfg = _tiny(tmp_path, GRPOConfig, task="grpo", beta=0.04)
    train_grpo(cfg)
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rec[-1]["train/onpolicy_ratio_dev"] == 0.0


def test_exported_lora_loads_into_the_diffusers_pipeline(tmp_path):
    import flowalign as fa

    cfg = _tiny(tmp_path, GRPOConfig, task="grpo")
    train_grpo(cfg)
    pipe = fa.load_model("tiny-sd3").pipe
    pipe.load_lora_weights(str(tmp_path / "run" / "lora"))
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())


@pytest.mark.parametrize("algo", ["grpo", "crd"])
def test_short_toy2d_run_raises_the_reward(tmp_path, algo):
    schema, train = (GRPOConfig, train_grpo) if algo == "grpo" else (CRDConfig, train_crd)
    extra = {"clip_range": 0.01, "beta": 0.0} if algo == "grpo" else {}
    cfg = load_config(schema, {"task": algo, "model": "toy2d", "reward": "toy2d-linear", "prompts": "toy2d:8gaussians",
                               "eval_prompts": None, "epochs": 16, "groups_per_epoch": 4, "group_size": 16,
                               "num_steps": 8, "rollout_batch_size": 64, "train_batch_size": 64, "lora_rank": 8,
                               "lr": 1e-3, "out": str(tmp_path / "run"), "save_every": 0, "progress": False,
                               "log_with": "none", **extra})
    train(cfg)
    r = [json.loads(line)["reward/mean"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r[:3]) / 3, sum(r[-3:]) / 3
    assert last > first + 0.2, r


@pytest.mark.parametrize("train_gs,zero_kl", [(None, True), (4.0, True), (1.0, False)])
def test_crd_trains_the_velocity_its_cfg_rollouts_sample_with(tmp_path, train_gs, zero_kl):
    # CFG-4 rollouts, KL to the CFG-4 reference. Before the first optimizer step the LoRA is zero, so the policy
    # is the reference: the KL is exactly 0 when the trained velocity is the CFG-4 one (the default: the rollouts'
    # scale), and not when it is the conditional velocity (which sampling then guides a second time)
    cfg = _tiny(tmp_path, CRDConfig, task="crd", guidance_scale=4.0, kl_guidance_scale=4.0, kl_beta=0.5,
                train_guidance_scale=train_gs)
    train_crd(cfg)
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["train/kl"] for r in rec if "train/kl" in r]
    assert (kl[0] == 0.0) == zero_kl, kl


def test_crd_cfg_free_rollouts_keep_a_cfg_kl_reference(tmp_path):
    # CFG-free rollouts carry no negative-prompt conditioning; the KL reference at CFG > 1 needs it re-encoded
    cfg = _tiny(tmp_path, CRDConfig, task="crd", guidance_scale=1.0, kl_guidance_scale=4.0, kl_beta=0.5,
                eval_prompts=str(tmp_path / "p.txt"), eval_guidance_scale=1.0, eval_num=2, eval_steps=2)
    summary = train_crd(cfg)
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rec[-1]["train/kl"] > 0 and "eval/jpeg-compressibility" in summary["after"]
