"""Few-step distillation: DMD / Re-DMD maths, a 1-step toy2d student against its teacher, and the tiny-SD3 student
(every trainable parameter trains, the saved student samples with its own step count)."""

import json

import pytest
import torch

import flowalign as fa
from flowalign.config import ConfigError, load_config
from flowalign.functional.dmd import cfg_combine, dm_gradient, dm_loss, reward_weights, shifted_uniform_sigmas
from flowalign.trainers.dmd import DMDConfig, train_dmd


# ----------------------------------------------------------------------------- functional maths
def test_dm_gradient_is_the_score_difference_normalised_per_sample():
    x = torch.randn(3, 4, 2, 2)
    real, fake = torch.randn_like(x), torch.randn_like(x)
    g = dm_gradient(x, real, fake)
    for i in range(3):
        torch.testing.assert_close(g[i], (fake[i] - real[i]) / (x[i] - real[i]).abs().mean())
    assert torch.equal(dm_gradient(x, real, real), torch.zeros_like(x))  # student at the teacher: no update
    assert torch.isfinite(dm_gradient(x, x, fake)).all()  # a zero normaliser does not give inf/NaN


def test_dm_loss_gradient_is_the_dm_direction():
    x = torch.randn(4, 3, requires_grad=True)
    grad = torch.randn(4, 3)
    dm_loss(x, grad).backward()
    torch.testing.assert_close(x.grad, grad / x.numel())
    x.grad = None
    w = torch.tensor([1.0, 2.0, 0.5, 0.0])
    dm_loss(x, grad, w).backward()
    torch.testing.assert_close(x.grad, grad * w[:, None] / x.numel())


def test_reward_weights_standardised_and_raw():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    z = (r - r.mean()) / r.std(unbiased=False)
    torch.testing.assert_close(reward_weights(r, 2.0), torch.exp(2.0 * z))
    torch.testing.assert_close(reward_weights(r, 0.5, standardize=False), torch.exp(0.5 * r))
    # standardising makes the weights invariant to the reward's offset and scale
    torch.testing.assert_close(reward_weights(10 * r + 3, 1.0), reward_weights(r, 1.0))


def test_cfg_conventions_differ_by_one():
    c, u = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(cfg_combine(c, u, 3.0, "cond"), cfg_combine(c, u, 4.0, "uncond"))
    torch.testing.assert_close(cfg_combine(c, u, 1.0, "uncond"), c)
    with pytest.raises(ValueError, match="convention"):
        cfg_combine(c, u, 1.0, "both")


def test_shifted_uniform_sigmas_range_and_shift():
    g = torch.Generator().manual_seed(0)
    s1 = shifted_uniform_sigmas(20000, 1.0, g)
    s5 = shifted_uniform_sigmas(20000, 5.0, torch.Generator().manual_seed(0))
    assert s1.min() >= 0.02 and s1.max() <= 0.98 and abs(s1.mean().item() - 0.5) < 0.01
    assert (s5 >= s1).all() and s5.mean() > 0.7  # a shift > 1 moves every level toward noise


def test_re_dmd_needs_a_reward_weight():
    with pytest.raises(ConfigError, match="reward_beta"):
        load_config(DMDConfig, {"task": "re-dmd"})


# ----------------------------------------------------------------------------- toy2d: 1-step student
def _toy_cfg(tmp_path, **kw):
    base = {"task": "dmd", "model": "toy2d", "reward": "toy2d-linear", "prompts": "toy2d:8gaussians",
            "eval_prompts": None, "epochs": 60, "groups_per_epoch": 1, "group_size": 256, "student_steps": 1,
            "lr": 1e-3, "finetune": "full", "save_every": 0, "log_with": "none", "progress": False,
            "out": str(tmp_path / "run")}
    return load_config(DMDConfig, {**base, **kw})


def _points(model, n, seed, steps=None):
    return fa.sample(model, ["8gaussians"] * n, num_steps=steps, generator=torch.Generator().manual_seed(seed)).images


def test_one_step_dmd_student_matches_the_teacher_on_toy2d(tmp_path):
    from flowalign.zoo.toy2d import energy_distance

    train_dmd(_toy_cfg(tmp_path))
    student = fa.load_model(str(tmp_path / "run" / "student"))
    assert student.default_num_steps == 1 and student.default_guidance_scale == 1.0
    teacher = fa.load_model("toy2d")
    ref = _points(teacher, 2000, 1, steps=50)
    one_step_teacher = energy_distance(_points(teacher, 2000, 2, steps=1), ref)
    dist = energy_distance(_points(student, 2000, 3), ref)
    # the teacher run for 1 step collapses toward the mean (about 0.56); the student is close to the noise floor
    assert dist < 0.1 * one_step_teacher, (dist, one_step_teacher)


def test_re_dmd_weights_samples_by_reward_and_keeps_fidelity(tmp_path):
    from flowalign.zoo.toy2d import energy_distance

    train_dmd(_toy_cfg(tmp_path, task="re-dmd", reward_beta=1.0))
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # standardised rewards: the largest weight exp(beta z_max) is above 1 and the rewards are logged
    assert all(r["train/weight_max"] > 1.0 and "reward/mean" in r for r in rec)
    teacher = fa.load_model("toy2d")
    ref = _points(teacher, 2000, 1, steps=50)
    dist = energy_distance(_points(fa.load_model(str(tmp_path / "run" / "student")), 2000, 3), ref)
    assert dist < 0.1 * energy_distance(_points(teacher, 2000, 2, steps=1), ref)


# ----------------------------------------------------------------------------- tiny SD3 student
def test_dmd_trains_every_lora_parameter_and_saves_a_sampling_student(tmp_path):
    from flowalign.trainers import loop

    (tmp_path / "p.txt").write_text("a red circle\ntwo blue squares\n")
    cfg = load_config(DMDConfig, {"model": "tiny-sd3", "reward": "jpeg-compressibility",
                                  "prompts": str(tmp_path / "p.txt"), "eval_prompts": None, "epochs": 2,
                                  "groups_per_epoch": 2, "group_size": 1, "ttur": 2, "student_steps": 2,
                                  "lora_rank": 4, "lr": 1e-2, "out": str(tmp_path / "run"), "progress": False,
                                  "log_with": "none", "guidance_scale": 3.0})
    seen = {}
    orig = loop.Run.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        seen["before"] = [p.detach().clone() for p in self.params]
        seen["run"] = self

    loop.Run.__init__ = init
    try:
        train_dmd(cfg)
    finally:
        loop.Run.__init__ = orig
    run = seen["run"]
    last = max(int(n.split(".")[1]) for n in run.param_names if n.startswith("transformer_blocks."))
    dead = f"transformer_blocks.{last}.attn.add_q_proj."  # SD3's last block discards its context stream
    unchanged = [n for n, a, b in zip(run.param_names, seen["before"], run.params)
                 if torch.equal(a, b.detach()) and not n.startswith(dead)]
    assert not unchanged, unchanged[:5]
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor([r["train/dm_loss"], r["train/critic_loss"]])).all() for r in rec)
    student = fa.load_model(str(tmp_path / "run" / "student"))
    assert student.default_num_steps == 2 and student.default_guidance_scale == 1.0
    traj = fa.sample(student, ["a red circle"], generator=torch.Generator().manual_seed(0))
    assert traj.latents.shape[1] == 3 and torch.isfinite(traj.images).all()


def test_frechet_distance_matches_the_gaussian_closed_form():
    from flowalign.functional.metrics import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g)
    b = torch.randn(20000, 3, generator=g) * 2 + torch.tensor([1.0, 0.0, 0.0])
    # N(0, I) vs N(m, 4I): |m|^2 + tr(I + 4I - 2 * 2I) = 1 + 3
    assert abs(frechet_distance(a, b) - 4.0) < 0.1
    assert abs(frechet_distance(a, a)) < 1e-6
    with pytest.raises(ValueError, match="equal D"):
        frechet_distance(a, b[:, :2])
