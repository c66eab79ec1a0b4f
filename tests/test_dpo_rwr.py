"""Flow-DPO and Flow-RWR: the maths against hand computations, "it trains" on tiny SD3, the reward rises on toy2d,
and the offline preference-pair file (a valid file trains; a bad line is an error that names it)."""

import json
import math

import pytest
import torch
from conftest import untrained_lora_parameters

from flowalign.config import ConfigError, load_config
from flowalign.functional.dpo import flow_dpo_loss, flow_matching_error, preference_pairs, rwr_weights, sample_sigmas
from flowalign.trainers.dpo import DPOConfig, load_pairs, train_dpo
from flowalign.trainers.rwr import RWRConfig, train_rwr


# ----------------------------------------------------------------------------- maths
def test_flow_matching_error_is_the_per_sample_mean_square():
    v = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    u = torch.tensor([[[1.0, 0.0], [3.0, 0.0]], [[1.0, -1.0], [1.0, -1.0]]])
    torch.testing.assert_close(flow_matching_error(v, u), torch.tensor([(4.0 + 16.0) / 4, 1.0]))


def test_flow_dpo_loss_matches_a_hand_computation():
    # inside = -beta/2 [(err_w - ref_w) - (err_l - ref_l)] = -1 * [(1 - 1.5) - (2 - 1)] = 1.5
    err_w, err_l = torch.tensor([1.0], requires_grad=True), torch.tensor([2.0], requires_grad=True)
    loss, info = flow_dpo_loss(err_w, err_l, torch.tensor([1.5]), torch.tensor([1.0]), beta=2.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-6)
    assert info["implicit_acc"] == 1 and info["margin"].item() == pytest.approx(1.5)
    loss.backward()
    # d/d err_w = (beta/2) sigmoid(-inside) > 0: lowering the chosen sample's error lowers the loss
    s = 1 / (1 + math.exp(1.5))
    assert err_w.grad.item() == pytest.approx(s, abs=1e-6) and err_l.grad.item() == pytest.approx(-s, abs=1e-6)


def test_flow_dpo_loss_is_log2_when_policy_equals_reference():
    e = torch.rand(5)
    loss, info = flow_dpo_loss(e[:3], e[2:], e[:3], e[2:], beta=100.0)
    assert loss.item() == pytest.approx(math.log(2)) and info["implicit_acc"] == 0


def test_preference_pairs_best_worst_all_and_margin():
    r = torch.tensor([0.2, 0.9, 0.1, 0.5, 0.5, 0.5, 3.0, 1.0])
    g = torch.tensor([7, 7, 7, 2, 2, 2, 4, 4])  # group 2 ties: no pair
    w, l = preference_pairs(r, g, "best-worst")
    assert sorted(zip(w.tolist(), l.tolist())) == [(1, 2), (6, 7)]
    w, l = preference_pairs(r, g, "all")
    assert sorted(zip(w.tolist(), l.tolist())) == [(0, 2), (1, 0), (1, 2), (6, 7)]
    w, l = preference_pairs(r, g, "all", margin=0.5)  # gaps 0.1, 0.7, 0.8, 2.0
    assert sorted(zip(w.tolist(), l.tolist())) == [(1, 0), (1, 2), (6, 7)]


def test_rwr_weights_match_a_hand_computation():
    a = torch.tensor([1.0, 0.0, -1.0, 0.3, 0.3])
    g = torch.tensor([0, 0, 0, 1, 1])
    w = rwr_weights(a, g, temperature=1.0)
    z = math.e + 1 + 1 / math.e
    torch.testing.assert_close(w, torch.tensor([3 * math.e / z, 3 / z, 3 / (math.e * z), 1.0, 1.0]))
    # temperature 0.5 doubles the exponent; the weights still average 1 within each group
    w = rwr_weights(a, g, temperature=0.5)
    assert w[:3].mean().item() == pytest.approx(1.0) and w[0] / w[1] == pytest.approx(math.e ** 2, rel=1e-5)
    torch.testing.assert_close(rwr_weights(a, g, 2.0, "exp"), torch.exp(a / 2))
    with pytest.raises(ValueError, match="temperature"):
        rwr_weights(a, g, 0.0)


def test_sample_sigmas():
    s = sample_sigmas(4000, torch.Generator().manual_seed(0), "logit-normal")
    assert 0 < s.min() and s.max() < 1 and abs(s.median().item() - 0.5) < 0.03
    # logit-normal(0, 1) puts less mass near the ends than uniform
    assert ((s < 0.1) | (s > 0.9)).float().mean() < 0.1
    u = sample_sigmas(4000, torch.Generator().manual_seed(0), "uniform")
    assert abs(((u < 0.1) | (u > 0.9)).float().mean().item() - 0.2) < 0.03


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="group_size"):
        load_config(DPOConfig, {"group_size": 1})
    with pytest.raises(ConfigError, match="pairs"):
        load_config(DPOConfig, {"pairs": str(tmp_path / "missing.jsonl")})
    with pytest.raises(ConfigError, match="temperature"):
        load_config(RWRConfig, {"temperature": 0.0})


# ----------------------------------------------------------------------------- it trains (tiny SD3)
def _tiny(tmp_path, schema, **kw):
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    base = {"model": "tiny-sd3", "reward": "jpeg-compressibility", "prompts": str(tmp_path / "p.txt"),
            "eval_prompts": None, "epochs": 2, "groups_per_epoch": 2, "group_size": 2, "num_steps": 3,
            "rollout_batch_size": 4, "train_batch_size": 4, "lora_rank": 4, "out": str(tmp_path / "run"),
            "progress": False, "log_with": "none", "lr": 1e-2}
    return load_config(schema, {**base, **kw})


def _check_trained(tmp_path, train):
    # two optimizer steps at least: LoRA starts with B = 0, so A's first gradient is exactly zero
    import flowalign as fa

    model = fa.load_model("tiny-sd3")
    _, unchanged = untrained_lora_parameters(lambda: train(model))
    assert not unchanged, f"parameters that did not train: {unchanged[:5]}"
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rec if "train/loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").exists()
    return rec


def test_online_dpo_trains_every_lora_parameter(tmp_path):
    cfg = _tiny(tmp_path, DPOConfig, task="dpo", sampler="flow-sde")
    rec = _check_trained(tmp_path, lambda model: train_dpo(cfg, model=model))
    assert all(r["train/pairs"] == 2 for r in rec[-2:])  # best vs worst of each of the 2 groups
    assert rec[0]["train/implicit_acc"] == 0  # the first step: policy == reference, so no pair is ranked yet


def test_rwr_trains_every_lora_parameter(tmp_path):
    cfg = _tiny(tmp_path, RWRConfig, task="rwr", train_guidance_scale=2.0)  # CFG in training: both branches
    _check_trained(tmp_path, lambda model: train_rwr(cfg, model=model))


# ----------------------------------------------------------------------------- offline pairs
def _pairs_file(tmp_path, lines: list[str]):
    import numpy as np
    from PIL import Image

    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        size = 32 if i < 2 else 48  # the third image is resized to the training size
        Image.fromarray(np.full((size, size, 3), colour, dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = ['{"prompt": "a red circle", "chosen": "img0.png", "rejected": "img1.png"}', "",
        '{"prompt": "a blue square", "chosen": "img1.png", "rejected": "img2.png"}']


def test_offline_dpo_trains_from_a_pairs_file(tmp_path):
    path = _pairs_file(tmp_path, GOOD)
    assert [(p.prompt, p.line) for p in load_pairs(path)] == [("a red circle", 1), ("a blue square", 3)]
    cfg = _tiny(tmp_path, DPOConfig, task="dpo", pairs=str(path), pairs_per_epoch=4)
    rec = _check_trained(tmp_path, lambda model: train_dpo(cfg, model=model))
    assert rec[-1]["train/pairs"] == 4 and "reward/mean" not in rec[-1]


@pytest.mark.parametrize("bad,message", [
    ('{"prompt": "x", "chosen": "img0.png", "rejected": "img1.png", "score": 1}', r"pairs.jsonl:4: unknown field"),
    ('{"prompt": "x", "chosen": "img0.png", "rejected": "nope.png"}', r"pairs.jsonl:4: the rejected image 'nope.png'"),
    ('{"prompt": "x", "chosen": "img0.png", "rej', r"pairs.jsonl:4: not valid JSON"),
    ('{"prompt": "x", "chosen": "img0.png"}', r"pairs.jsonl:4: missing field\(s\) \['rejected'\]"),
])
def test_bad_pairs_file_names_the_line(tmp_path, bad, message):
    path = _pairs_file(tmp_path, GOOD + [bad])
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_pairs(path)
    cfg = _tiny(tmp_path, DPOConfig, task="dpo", pairs=str(path), epochs=1)
    with pytest.raises((ValueError, FileNotFoundError), match=message):  # at setup, before any training
        train_dpo(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- the reward rises (toy2d)
@pytest.mark.parametrize("algo", ["dpo", "rwr"])
def test_short_toy2d_run_raises_the_reward(tmp_path, algo):
    import flowalign as fa

    schema, train = (DPOConfig, train_dpo) if algo == "dpo" else (RWRConfig, train_rwr)
    extra = {"beta": 10.0, "pairing": "all", "train_batch_size": 128} if algo == "dpo" else {"temperature": 0.5}
    cfg = load_config(schema, {"task": algo, "model": "toy2d", "reward": "toy2d-linear", "prompts": "toy2d:8gaussians",
                               "eval_prompts": None, "epochs": 16, "groups_per_epoch": 4, "group_size": 16,
                               "num_steps": 8, "rollout_batch_size": 64, "train_batch_size": 64, "lora_rank": 8,
                               "lr": 3e-3, "out": str(tmp_path / "run"), "save_every": 0, "progress": False,
                               "log_with": "none", **extra})
    model, reward = fa.load_model("toy2d"), fa.rewards.load("toy2d-linear")

    def mean_reward():  # 1024 ODE samples from fixed noise: the same points before and after
        traj = fa.sample(model, ["8gaussians"], num_steps=8, num_images_per_prompt=1024,
                         generator=torch.Generator().manual_seed(7))
        return reward(traj.images, traj.prompts).mean().item()

    before = mean_reward()
    train(cfg, model=model)
    after = mean_reward()
    # measured (seeds 0-3): dpo +0.65 to +0.74, rwr +0.9 to +2.9; the base's mean is 0.02 (r = y, 8 modes on a circle)
    assert after > before + (0.3 if algo == "dpo" else 0.5), (before, after)


def _toy2d_rwr_mean_reward(tmp_path, rollout_policy: str, temperature: float, epochs: int) -> float:
    import flowalign as fa

    cfg = load_config(RWRConfig, "configs/rwr/toy2d.yaml",
                      [f"out={tmp_path / rollout_policy}", f"rollout_policy={rollout_policy}",
                       f"temperature={temperature}", f"epochs={epochs}", "save_every=0", "progress=false"])
    model, reward = fa.load_model("toy2d"), fa.rewards.load("toy2d-linear")
    train_rwr(cfg, model=model)
    traj = fa.sample(model, ["8gaussians"], num_steps=10, num_images_per_prompt=4096,
                     generator=torch.Generator().manual_seed(7))
    return reward(traj.images, traj.prompts).mean().item()


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_rwr_from_reference_rollouts_lands_on_the_kl_optimum(tmp_path, temperature):
    """Offline RWR (rollouts from the frozen base) has the fixed point p* ∝ p_base exp(r / (tau std_base(r))); its
    mean reward is computed exactly here by importance weights over 20,000 base samples. Online RWR re-tilts every
    epoch and runs far past it."""
    import flowalign as fa

    base, reward = fa.load_model("toy2d"), fa.rewards.load("toy2d-linear")
    traj = fa.sample(base, ["8gaussians"], num_steps=10, num_images_per_prompt=20000,
                     generator=torch.Generator().manual_seed(3))
    r = reward(traj.images, traj.prompts)
    p_star = (torch.softmax(r / (temperature * r.std()), 0) * r).sum().item()  # 1.59 (tau 0.5), 1.14 (tau 1)
    offline = _toy2d_rwr_mean_reward(tmp_path, "reference", temperature, epochs=300)
    # measured (seeds 0, 1): 1.56 at tau 0.5; 1.09 at tau 1.0, 1.78 against 1.87 at tau 0.25
    assert abs(offline - p_star) < 0.15, (offline, p_star)
    if temperature == 0.5:
        online = _toy2d_rwr_mean_reward(tmp_path, "policy", temperature, epochs=100)
        assert online > p_star + 3, (online, p_star)  # measured: 19.5 after 100 epochs


# ----------------------------------------------------------------------------- the pretraining-loss term
def test_rwr_pretraining_term_fits_the_renders(tmp_path):
    """``pretrain_weight`` adds flow matching on ground-truth renders of the prompts: when it dominates the loss,
    the model's error on fresh renders falls by more than when it is a vanishing share of the same loss."""
    from flowalign.zoo.shapes_data import sample_specs

    captions = sorted({s.caption() for s in sample_specs(40, "train", seed=0)})
    prompts = tmp_path / "shapes.txt"
    prompts.write_text("\n".join(captions) + "\n")
    drops = {}
    for beta in (1e-4, 100.0):
        out = tmp_path / f"beta{beta}"
        cfg = load_config(RWRConfig, {
            "model": "tiny-sd3", "reward": "jpeg-compressibility", "prompts": str(prompts), "eval_prompts": None,
            "epochs": 10, "groups_per_epoch": 4, "group_size": 4, "num_steps": 3, "rollout_batch_size": 16,
            "train_batch_size": 16, "train_timesteps": 2, "lora_rank": 8, "lr": 2e-2, "pretrain_weight": beta,
            "out": str(out), "progress": False, "log_with": "none", "seed": 0})
        train_rwr(cfg)
        errs = [json.loads(line)["train/pretrain_err"] for line in (out / "metrics.jsonl").read_text().splitlines()
                if "train/pretrain_err" in line]
        assert len(errs) == 10 and all(math.isfinite(e) for e in errs)
        drops[beta] = sum(errs[:3]) / sum(errs[-3:])
    assert drops[100.0] > 1.2 * drops[1e-4], drops


def test_rwr_pretraining_term_needs_shapes_captions(tmp_path):
    (tmp_path / "other.txt").write_text("a lighthouse at dusk\n")
    cfg = _tiny(tmp_path, RWRConfig, task="rwr", pretrain_weight=1.0, prompts=str(tmp_path / "other.txt"))
    with pytest.raises(ConfigError, match="renders"):
        train_rwr(cfg)
