"""Few-step distillation: DMD / Re-DMD maths, a 1-step toy2d student against its teacher, and the tiny-SD3 student
(every trainable parameter trains, the saved student samples with its own step count)."""

import json

import pytest
import torch
from conftest import untrained_lora_parameters

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

    stale = tmp_path / "run" / "student"
    stale.mkdir(parents=True)
    (stale / "flowalign.json").write_text('{"num_steps": 9, "sampler": "flow-sde"}')  # an earlier run's settings
    train_dmd(_toy_cfg(tmp_path))
    student = fa.load_model(str(tmp_path / "run" / "student"))
    assert (student.default_num_steps, student.default_sampler, student.default_guidance_scale) == (1, "cps", 1.0)
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
    (tmp_path / "p.txt").write_text("a red circle\ntwo blue squares\n")
    cfg = load_config(DMDConfig, {"model": "tiny-sd3", "reward": "jpeg-compressibility",
                                  "prompts": str(tmp_path / "p.txt"), "eval_prompts": None, "epochs": 2,
                                  "groups_per_epoch": 2, "group_size": 1, "ttur": 2, "student_steps": 2,
                                  "lora_rank": 4, "lr": 1e-2, "out": str(tmp_path / "run"), "progress": False,
                                  "log_with": "none", "guidance_scale": 3.0})
    _, unchanged = untrained_lora_parameters(lambda: train_dmd(cfg))
    assert not unchanged, unchanged[:5]
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor([r["train/dm_loss"], r["train/critic_loss"]])).all() for r in rec)
    student = fa.load_model(str(tmp_path / "run" / "student"))
    assert (student.default_num_steps, student.default_sampler, student.default_guidance_scale) == (2, "cps", 1.0)
    traj = fa.sample(student, ["a red circle"], generator=torch.Generator().manual_seed(0))
    assert traj.latents.shape[1] == 3 and torch.isfinite(traj.images).all()
    # the command line samples the student as trained, with no flags
    from flowalign.cli import main

    assert main(["sample", "--model", str(tmp_path / "run" / "student"), "--prompt", "a red circle",
                 "--out", str(tmp_path / "out")]) == 0
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert (settings["num_steps"], settings["sampler"], settings["eta"], settings["guidance_scale"]) == (2, "cps", 1.0,
                                                                                                           1.0)


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


def test_lora_critic_trains_only_its_adapter(tmp_path):
    from flowalign.trainers.dmd import DMD
    from flowalign.trainers.loop import run_task

    (tmp_path / "p.txt").write_text("a red circle\n")
    cfg = load_config(DMDConfig, {"model": "tiny-sd3", "reward": "jpeg-compressibility",
                                  "prompts": str(tmp_path / "p.txt"), "eval_prompts": None, "epochs": 2,
                                  "groups_per_epoch": 1, "group_size": 2, "ttur": 2, "student_steps": 2,
                                  "lora_rank": 4, "lr": 1e-2, "critic_finetune": "lora", "out": str(tmp_path / "run"),
                                  "progress": False, "log_with": "none"})
    algo = DMD(cfg)
    model = fa.load_model("tiny-sd3")
    run_task(cfg, algo, model=model)
    trained = algo.critic_params
    assert trained and all("lora_" in n for n in trained)
    frozen = [n for n, _ in algo.critic.named_parameters() if n not in trained]
    # the copy's base weights stay the teacher's (the student's frozen base); its adapter trained on its own
    assert frozen and all(torch.equal(algo.critic.get_parameter(n), model.transformer.get_parameter(n)) for n in frozen)
    assert all(not torch.equal(p, model.transformer.get_parameter(n)) for n, p in trained.items()
               if "lora_B" in n and ".attn.to_q." in n)


# ----------------------------------------------------------------------------- RG-LCD
def test_lcd_pieces():
    from flowalign.functional.flow import x0_from_velocity
    from flowalign.functional.lcd import euler_solver_step, pseudo_huber, skip_pairs

    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    hi, lo = torch.tensor([0.9, 0.5, 0.3, 0.2]), torch.tensor([0.7, 0.4, 0.0, 0.1])
    x_hi = (1 - hi[:, None]) * x0 + hi[:, None] * eps
    # on a straight path (v = eps - x0) the solver step lands exactly on the forward process at sigma_lo
    torch.testing.assert_close(euler_solver_step(x_hi, eps - x0, hi, lo), (1 - lo[:, None]) * x0 + lo[:, None] * eps)
    # the consistency function f(x, sigma) = x - sigma v meets f(x, 0) = x whatever v is
    torch.testing.assert_close(x0_from_velocity(x_hi, torch.randn(4, 3), torch.zeros(4)), x_hi)
    big, small = torch.tensor([3.0]), torch.tensor([1e-5])
    assert abs(pseudo_huber(big, torch.zeros(1)) - 3.0) < 2e-3  # ~ |d| far away
    assert abs(pseudo_huber(small, torch.zeros(1)) - 1e-10 / 2e-3) < 1e-9  # ~ d^2 / 2c near 0
    s = torch.linspace(1, 0, 11)
    a, b = skip_pairs(s, 500, 2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a - b, torch.full_like(a, 0.2))
    assert b.min() == 0 and a.max() == 1
    with pytest.raises(ValueError, match="skip"):
        skip_pairs(s, 2, 11, torch.Generator())


def _lcd_cfg(tmp_path, **kw):
    from flowalign.trainers.rg_lcd import RGLCDConfig

    base = {"model": "toy2d", "reward": "toy2d-linear", "prompts": "toy2d:8gaussians", "eval_prompts": None,
            "epochs": 40, "groups_per_epoch": 1, "group_size": 256, "num_steps": 20, "rollout_batch_size": 256,
            "train_batch_size": 32, "student_steps": 1, "solver_steps": 20, "skip": 1, "train_timesteps": 1,
            "lr": 1e-3, "finetune": "full", "save_every": 0, "log_with": "none", "progress": False,
            "out": str(tmp_path / "run")}
    return load_config(RGLCDConfig, {**base, **kw})


def test_rg_lcd_reward_term_raises_the_one_step_students_reward(tmp_path):
    from flowalign.trainers.rg_lcd import train_rg_lcd
    from flowalign.zoo.toy2d import LinearReward, energy_distance

    train_rg_lcd(_lcd_cfg(tmp_path, reward_scale=0.0, out=str(tmp_path / "lcd")))
    train_rg_lcd(_lcd_cfg(tmp_path, reward_scale=0.3, out=str(tmp_path / "rg")))
    teacher = fa.load_model("toy2d")
    ref = _points(teacher, 2000, 1, steps=50)
    lcd, rg = (fa.load_model(str(tmp_path / k / "student")) for k in ("lcd", "rg"))
    assert lcd.default_num_steps == 1 and lcd.default_sampler == "cps"
    x_lcd, x_rg = _points(lcd, 2000, 3), _points(rg, 2000, 3)
    # plain LCD: a 1-step student much closer to the teacher than the teacher run for 1 step (0.0085 vs 0.57)
    assert energy_distance(x_lcd, ref) < 0.1 * energy_distance(_points(teacher, 2000, 2, steps=1), ref)
    reward = LinearReward()
    assert reward(x_rg, ["8gaussians"] * 2000).mean() > reward(x_lcd, ["8gaussians"] * 2000).mean() + 0.1


def test_rg_lcd_needs_a_differentiable_reward(tmp_path):
    from flowalign.trainers.rg_lcd import train_rg_lcd

    (tmp_path / "p.txt").write_text("a red circle\n")
    cfg = _lcd_cfg(tmp_path, model="tiny-sd3", reward="jpeg-compressibility", prompts=str(tmp_path / "p.txt"),
                   finetune="lora", group_size=2, rollout_batch_size=2, train_batch_size=2, num_steps=2)
    with pytest.raises(ConfigError, match="not differentiable"):
        train_rg_lcd(cfg)
    train_rg_lcd(_lcd_cfg(tmp_path, model="tiny-sd3", reward="jpeg-compressibility", prompts=str(tmp_path / "p.txt"),
                          finetune="lora", lora_rank=4, group_size=2, rollout_batch_size=2, train_batch_size=2,
                          num_steps=2, epochs=2, reward_scale=0.0, student_steps=2, out=str(tmp_path / "ok")))
    student = fa.load_model(str(tmp_path / "ok" / "student"))
    assert (student.default_num_steps, student.default_sampler, student.default_guidance_scale) == (2, "cps", 1.0)


def test_rg_lcd_latent_proxy_reward_learns_online_from_a_non_differentiable_expert(tmp_path):
    from flowalign.trainers.loop import run_task
    from flowalign.trainers.rg_lcd import RGLCD, train_rg_lcd

    with pytest.raises(ConfigError, match="image latents"):
        train_rg_lcd(_lcd_cfg(tmp_path, reward_via="lrm", out=str(tmp_path / "toy")))
    (tmp_path / "p.txt").write_text("a red circle\ntwo blue squares\n")
    cfg = _lcd_cfg(tmp_path, model="tiny-sd3", reward="jpeg-compressibility", prompts=str(tmp_path / "p.txt"),
                   finetune="lora", lora_rank=4, group_size=2, rollout_batch_size=4, train_batch_size=4,
                   num_steps=2, epochs=2, reward_via="lrm", reward_scale=1.0, lrm_batch=3, lrm_lr=1e-2,
                   student_steps=2, out=str(tmp_path / "lrm"))
    algo = RGLCD(cfg)
    lrm_before = []
    build = algo.build_lrm

    def build_and_remember(run):
        lrm = build(run)
        lrm_before.extend(p.detach().clone() for p in algo.lrm_params)
        return lrm

    algo.build_lrm = build_and_remember
    _, unchanged = untrained_lora_parameters(lambda: run_task(cfg, algo, model=fa.load_model("tiny-sd3")))
    assert not unchanged, unchanged[:5]  # the LRM's gradient reaches every LoRA parameter through z0
    assert lrm_before and all(not torch.equal(a, b) for a, b in zip(lrm_before, algo.lrm_params))
    rec = [json.loads(line) for line in (tmp_path / "lrm" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/lrm_loss"] >= 0 and 0 <= r["train/lrm_agree"] <= 1 for r in rec)
