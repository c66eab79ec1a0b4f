"""Flash-DMD and the adversarial terms: the GAN and step-DPO maths, Flash-DMD reducing to DMD when its additions
are off, the critic's pull toward the student, the discriminator learning, joint RL raising the reward on toy2d,
and every trainable part training on tiny SD3."""

import json
import math

import pytest
import torch
from conftest import untrained_lora_parameters

import flowalign as fa
from flowalign.config import ConfigError, load_config
from flowalign.functional.dmd import gan_discriminator_loss, gan_generator_loss, step_dpo_loss
from flowalign.trainers.dmd import DMD, DMDConfig
from flowalign.trainers.flash_dmd import FlashDMD, FlashDMDConfig
from flowalign.trainers.loop import run_task


# ----------------------------------------------------------------------------- maths
def test_gan_losses_are_the_non_saturating_ones():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0], requires_grad=True)
    sp = torch.nn.functional.softplus
    expected_d = (sp(fake.detach()).mean() + sp(-real).mean())
    torch.testing.assert_close(gan_discriminator_loss(real, fake.detach()), expected_d)
    g = gan_generator_loss(fake)
    torch.testing.assert_close(g, sp(-fake.detach()).mean())
    g.backward()
    assert (fake.grad < 0).all()  # descending the generator loss raises D(fake)


def test_step_dpo_loss_prefers_the_winner():
    lp_w = torch.tensor([0.0, 0.0], requires_grad=True)
    lp_l = torch.tensor([0.0, 0.0], requires_grad=True)
    ref = torch.zeros(2)
    loss = step_dpo_loss(lp_w, lp_l, ref, ref, beta=10.0)
    assert abs(loss.item() - math.log(2)) < 1e-6  # zero margin: -log sigmoid(0)
    loss.backward()
    torch.testing.assert_close(lp_w.grad, torch.full((2,), -10.0 * 0.5 / 2))  # raise log p(w)
    torch.testing.assert_close(lp_l.grad, torch.full((2,), 10.0 * 0.5 / 2))  # lower log p(l)
    margin = (torch.tensor([0.3]) - 0.1) - (torch.tensor([-0.2]) - 0.05)
    torch.testing.assert_close(step_dpo_loss(torch.tensor([0.3]), torch.tensor([-0.2]), torch.tensor([0.1]),
                                             torch.tensor([0.05]), beta=2.0),
                               -torch.nn.functional.logsigmoid(2.0 * margin).mean())


def test_flash_dmd_config_checks():
    with pytest.raises(ConfigError, match="stochastic student step"):
        load_config(FlashDMDConfig, {"rl_every": 5, "student_sampler": "ode"})
    with pytest.raises(ConfigError, match="critic_ema"):
        load_config(FlashDMDConfig, {"critic_ema": 0.0})


# ----------------------------------------------------------------------------- toy2d
def _toy(tmp_path, schema=FlashDMDConfig, **kw):
    base = {"task": "flash-dmd" if schema is FlashDMDConfig else "dmd", "model": "toy2d", "reward": "toy2d-linear",
            "prompts": "toy2d:8gaussians", "eval_prompts": None, "epochs": 6, "groups_per_epoch": 1,
            "group_size": 128, "student_steps": 4, "lr": 1e-3, "finetune": "full", "save_every": 0,
            "log_with": "none", "progress": False, "out": str(tmp_path / kw.pop("name", "run"))}
    return load_config(schema, {**base, **kw})


def test_flash_dmd_without_its_additions_is_dmd(tmp_path):
    """No noise split, no GAN, no critic pull and no RL: the same updates as DMD, bitwise."""
    flash = fa.load_model("toy2d")
    run_task(_toy(tmp_path, ttur=2, dm_sigma_min=0.0, gan_weight=0.0, critic_ema=1.0, name="flash"),
             FlashDMD(_toy(tmp_path, ttur=2, dm_sigma_min=0.0, gan_weight=0.0, critic_ema=1.0, name="flash")),
             model=flash)
    dmd = fa.load_model("toy2d")
    cfg = _toy(tmp_path, DMDConfig, ttur=2, name="dmd")
    run_task(cfg, DMD(cfg), model=dmd)
    init, changed = fa.load_model("toy2d").transformer, False
    for (n, a), (_, b) in zip(flash.transformer.named_parameters(), dmd.transformer.named_parameters()):
        assert torch.equal(a, b), n
        changed |= not torch.equal(a, init.get_parameter(n))
    assert changed


def test_critic_moves_toward_the_student_by_its_ema():
    algo = FlashDMD(load_config(FlashDMDConfig, {"critic_ema": 0.75}))
    algo.critic_params = {"w": torch.tensor([4.0, 0.0])}
    algo.student_of_critic = {"w": torch.tensor([0.0, 8.0])}
    algo.critic_toward_student()
    torch.testing.assert_close(algo.critic_params["w"], torch.tensor([3.0, 2.0]))


def test_discriminator_learns_to_tell_a_one_step_student_from_the_teacher(tmp_path):
    # a 1-step student starts far from the teacher's samples (it collapses toward the mean); with a negligible
    # student learning rate the critic-feature discriminator's heads alone learn to tell them apart
    cfg = _toy(tmp_path, DMDConfig, student_steps=1, lr=1e-9, ttur=1, gan_weight=1e-3, disc="critic",
               disc_lr=3e-3, real_pool=512, epochs=20)
    algo = DMD(cfg)
    run_task(cfg, algo, model=fa.load_model("toy2d"))
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # inputs are noised to a random level (the diffusion-GAN), so high-noise pairs stay indistinguishable and
    # the accuracy plateaus near 0.72 here; chance is 0.5 and a loss of log 4 = 1.386
    acc, loss = [r["train/disc_acc"] for r in rec], [r["train/gan_d_loss"] for r in rec]
    assert acc[0] < 0.6 and sum(acc[-5:]) / 5 > 0.65 and sum(loss[-5:]) / 5 < 1.2, (acc, loss)
    assert all(math.isfinite(r["train/gan_g_loss"]) for r in rec)


def test_joint_rl_raises_the_students_reward_on_toy2d(tmp_path):
    from flowalign.zoo.toy2d import LinearReward

    def mean_reward(name, **kw):
        train_cfg = _toy(tmp_path, ttur=3, critic_ema=1.0, gan_weight=0.0, epochs=12, name=name, **kw)
        run_task(train_cfg, FlashDMD(train_cfg), model=fa.load_model("toy2d"))
        student = fa.load_model(str(tmp_path / name / "student"))
        xs = fa.sample(student, ["8gaussians"], num_images_per_prompt=2000,
                       generator=torch.Generator().manual_seed(3)).images
        return LinearReward()(xs, ["8gaussians"] * len(xs)).mean().item()

    plain, rl = mean_reward("plain"), mean_reward("rl", rl_every=1)
    assert rl > plain + 0.2, (plain, rl)  # r = y; the modes of the 8 Gaussians lie at radius 1


# ----------------------------------------------------------------------------- tiny SD3
def test_flash_dmd_trains_the_student_and_the_discriminator_heads(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\ntwo blue squares\n")
    cfg = load_config(FlashDMDConfig, {
        "model": "tiny-sd3", "reward": "jpeg-compressibility", "prompts": str(tmp_path / "p.txt"),
        "eval_prompts": None, "epochs": 2, "groups_per_epoch": 2, "group_size": 2, "student_steps": 2,
        "dm_sigma_min": 0.9, "disc": "clip", "disc_backbone": "shapes-clip", "real_pool": 4, "rl_every": 1,
        "rl_candidates": 2, "critic_ema": 0.9, "lora_rank": 4, "lr": 1e-2, "out": str(tmp_path / "run"),
        "progress": False, "log_with": "none", "guidance_scale": 3.0})
    algo = FlashDMD(cfg)
    heads = []
    setup_gan = algo.setup_gan

    def setup_gan_and_remember_the_heads(run):
        setup_gan(run)
        heads.extend(p.detach().clone() for p in algo.disc_params)

    algo.setup_gan = setup_gan_and_remember_the_heads

    def train():
        model = fa.load_model("tiny-sd3")
        run_task(cfg, algo, model=model)
        return model

    _, unchanged = untrained_lora_parameters(train)
    assert not unchanged, unchanged[:5]
    assert algo.high == [0] and algo.low == [1]  # 2 steps: sigma 1 gets the DM loss, the last step the GAN
    assert heads and all(not torch.equal(a, b) for a, b in zip(heads, algo.disc_params))
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = ("train/dm_loss", "train/gan_g_loss", "train/gan_d_loss", "rl/dpo_loss", "train/critic_loss")
    assert all(math.isfinite(r[k]) for r in rec for k in keys)
    student = fa.load_model(str(tmp_path / "run" / "student"))
    assert (student.default_num_steps, student.default_guidance_scale) == (2, 1.0)
