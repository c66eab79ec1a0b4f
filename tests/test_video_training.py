"""Video latents end to end on the tiny random Wan 2.1 pipeline (``tiny-wan``: 16x16 px, 5 frames, latents
(B, 16, 2, 2, 2)): every sampler (on-policy log-probs, eta -> 0), search, Flow-NRG and Euphonium guidance with
per-objective weights over two video objectives, the grpo / crd / euphonium / re-dmd trainers with LoRA (every
adapter weight trains, finite losses, bitwise resume), and what an evaluation writes for video (animated grids,
the default eval rewards of a video world). Equality with the diffusers pipeline, the flow-sde eta = 0 case and
on-policy log-probs at the native size live in tests/test_models_flux_wan.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import gen

import flowalign as fa
from flowalign.config import load_config
from flowalign.io import grid, save_samples, video_grid
from flowalign.rewards import MultiReward, Reward
from flowalign.rewards.video import VideoReward
from flowalign.sampling import Trajectory
from flowalign.sampling.guidance import RewardGuidance
from flowalign.sampling.search import best_of_n, prune_search
from flowalign.trainers import loop
from flowalign.trainers.crd import CRDConfig, train_crd
from flowalign.trainers.data import world_of
from flowalign.trainers.dmd import DMDConfig, train_dmd
from flowalign.trainers.euphonium import EuphoniumConfig, train_euphonium
from flowalign.trainers.grpo import GRPOConfig, train_grpo

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "two blue squares"]
SDE = ["flow-sde", "dance-sde", "cps"]
#: captions of the moving-shapes video world (flowalign.zoo.shapes_video)
VIDEO_PROMPTS = ["a red circle moving left", "a blue square moving up and a green triangle moving right"]


# ----------------------------------------------------------------------------- video objectives
class Brightness(Reward):
    """Mean pixel value; the base class scores a video as the mean over its frames."""

    name = "brightness"
    uses_prompts = False

    def score(self, images, prompts):
        return images.mean((1, 2, 3))


class FrameMotion(VideoReward):
    """Motion energy: the mean squared difference of consecutive frames, times ``scale``."""

    name = "frame-motion"
    uses_prompts = False

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def score_video(self, videos, prompts):
        return self.scale * (videos[:, 1:] - videos[:, :-1]).pow(2).mean((1, 2, 3, 4))


@pytest.fixture(scope="module")
def wan():
    return fa.load_model("tiny-wan")


@pytest.fixture(scope="module")
def wan_wide_vae(wan):
    """tiny-wan's transformer and text encoder with a wider random Wan VAE (``base_dim`` 24 instead of 3).

    tiny-wan's VAE halves its 3 channels to 1 before every spatial upsampling, and Wan's RMS norm over a single
    channel is its sign, so the decoded pixels barely depend on the latents (largest singular value of
    d pixels / d latents: 0.027, against 6.4 at ``base_dim`` 8) and the gradients of any two pixel objectives
    point the same way (cosine 0.98 between brightness and frame motion): no weighting could tell them apart.
    """
    from diffusers import AutoencoderKLWan, WanPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=24, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    p = wan.pipe
    pipe = WanPipeline(tokenizer=p.tokenizer, text_encoder=p.text_encoder, vae=vae, scheduler=p.scheduler,
                       transformer=p.transformer)
    return fa.load_model(pipe).configure({"native_size": [16, 16, 5]})


# ----------------------------------------------------------------------------- 1. samplers
@pytest.mark.parametrize("sampler", SDE)
@pytest.mark.parametrize("num_frames", [5, 9])
def test_sde_trajectories_on_video_latents_and_exact_log_probs(wan, sampler, num_frames):
    """Groups of K = 2, shared noise, an SDE window: the recorded log-probs are recomputed exactly, on the whole
    batch, on any step subset and on a sub-batch (a training minibatch), and they depend on the conditioning."""
    traj = fa.sample(wan, PROMPTS, num_steps=4, sampler=sampler, num_images_per_prompt=2, same_noise_per_prompt=True,
                     sde_window=(1, 3), num_frames=num_frames, generator=gen(1))
    f = (num_frames - 1) // 4 + 1
    assert traj.latents.shape == (4, 5, 16, f, 2, 2) and traj.images.shape == (4, num_frames, 3, 16, 16)
    assert traj.log_probs.shape == (4, 4) and torch.isfinite(traj.log_probs).all()
    assert traj.stochastic.tolist() == [False, True, True, False]
    assert (traj.log_probs[:, [0, 3]] == 0).all() and (traj.log_probs[:, 1:3] != 0).all()
    assert torch.equal(traj.latents[0, 0], traj.latents[1, 0])  # shared initial noise within a group ...
    assert not torch.equal(traj.latents[0, -1], traj.latents[1, -1])  # ... different SDE noise
    lp, mean, std = fa.log_prob(wan, traj, with_mean=True)
    assert lp.shape == (4, 2) and mean.shape == std.shape == (4, 2, 16, f, 2, 2)
    assert (lp - traj.log_probs[:, 1:3]).abs().max().item() <= 1e-5
    sub = traj.index([3, 0])
    lp_sub = fa.log_prob(wan, sub, steps=[2])
    assert (lp_sub[:, 0] - traj.log_probs[[3, 0], 2]).abs().max().item() <= 1e-5
    # the check can fail: the same moves scored under another noise level
    other = fa.log_prob(wan, dataclasses.replace(traj, eta=traj.eta / 2))
    assert (other - traj.log_probs[:, 1:3]).abs().min() > 1e-2


@pytest.mark.parametrize("sampler", SDE)
def test_eta_to_zero_gives_the_ode_for_every_sde(wan, sampler):
    ode = fa.sample(wan, PROMPTS, num_steps=4, generator=gen(2))
    gaps = []
    for eta in (0.2, 0.02, 0.002, 0.0):
        sto = fa.sample(wan, PROMPTS, num_steps=4, sampler=sampler, eta=eta, generator=gen(2))
        gaps.append((sto.latents - ode.latents).abs().max().item())
    assert gaps[0] > 1e-2 and gaps[0] > gaps[1] > gaps[2], gaps  # measured ~linear in eta
    assert gaps[-1] <= 1e-5 and (sto.images - ode.images).abs().max().item() <= 1e-5


def test_trajectory_chunks_concatenate_like_one_batch(wan):
    """Rollouts run in chunks (Run.rollout): concatenated video trajectories rescore as one batch."""
    a = fa.sample(wan, PROMPTS[:1], num_steps=3, sampler="flow-sde", num_images_per_prompt=2, generator=gen(3))
    b = fa.sample(wan, PROMPTS[1:], num_steps=3, sampler="flow-sde", num_images_per_prompt=2, generator=gen(4))
    both = Trajectory.cat([a, b])
    assert both.latents.shape == (4, 4, 16, 2, 2, 2) and both.images.shape == (4, 5, 3, 16, 16)
    assert both.prompts == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert (fa.log_prob(wan, both) - both.log_probs).abs().max().item() <= 1e-5


def test_search_over_video_candidates(wan):
    motion = FrameMotion()
    res = best_of_n(wan, PROMPTS, motion, n=3, num_steps=3, generator=gen(5))
    assert res.images.shape == (2, 5, 3, 16, 16) and res.candidate_latents.shape == (2, 3, 16, 2, 2, 2)
    traj = fa.sample(wan, PROMPTS[:1], num_steps=3, num_images_per_prompt=3, generator=gen(5))
    assert torch.equal(res.candidate_latents[0], traj.x0)  # the candidates fa.sample draws
    assert torch.equal(res.scores, res.candidate_scores.max(1).values)
    assert torch.allclose(motion(res.images), res.scores)
    pruned = prune_search(wan, PROMPTS[:1], motion, n=4, num_steps=4, prune_at=(1,), keep=0.5, generator=gen(5))
    assert pruned.survivors == [4, 2] and pruned.nfe == 4 * 2 + 2 * 2 and pruned.images.shape == (1, 5, 3, 16, 16)


# ----------------------------------------------------------------------------- 2. guidance
def _objectives() -> MultiReward:
    return MultiReward({Brightness(): 1.0, FrameMotion(): 1.0})


@pytest.mark.parametrize("mode", ["nrg", "euphonium"])
@pytest.mark.parametrize("under_guided", [False, True])
def test_guided_video_sampling_keeps_exact_log_probs(wan, mode, under_guided):
    guide = RewardGuidance(_objectives(), scale=5.0, mode=mode, normalize=True,
                           log_prob_under_guided_mean=under_guided, record=True)
    traj = fa.sample(wan, PROMPTS, num_steps=3, sampler="flow-sde", guidance=guide, generator=gen(6))
    base = fa.sample(wan, PROMPTS, num_steps=3, sampler="flow-sde", generator=gen(6))
    assert (traj.latents[:, 1:] - base.latents[:, 1:]).abs().max() > 1e-3  # the guidance moved the samples
    assert (traj.guidance_shifts is not None) == under_guided
    if under_guided:
        assert traj.guidance_shifts.shape == (2, 3, 16, 2, 2, 2)
    assert (fa.log_prob(wan, traj) - traj.log_probs).abs().max().item() <= 1e-5
    assert [h["step"] for h in guide.history] == [0, 1, 2]
    assert set(guide.history[0]["rewards"]) == {"brightness", "frame-motion"}
    zero = fa.sample(wan, PROMPTS, num_steps=3, sampler="flow-sde", guidance=guide.with_scale(0.0), generator=gen(6))
    assert torch.equal(zero.latents, base.latents) and torch.equal(zero.log_probs, base.log_probs)


def test_guidance_through_the_video_transformer(wan):
    plain = RewardGuidance(FrameMotion(), scale=5.0, normalize=True, record=True)
    through = RewardGuidance(FrameMotion(), scale=5.0, normalize=True, grad_through_model=True,
                             gradient_checkpointing=True, record=True)
    a = fa.sample(wan, PROMPTS, num_steps=2, guidance=plain, generator=gen(7))
    b = fa.sample(wan, PROMPTS, num_steps=2, guidance=through, generator=gen(7))
    assert torch.isfinite(b.latents).all() and not wan.transformer.is_gradient_checkpointing
    assert (a.latents[:, -1] - b.latents[:, -1]).abs().max() > 1e-5  # d x0_hat / d x = I - sigma dv/dx differs


@pytest.mark.parametrize("mode,sampler", [("nrg", "ode"), ("euphonium", "dance-sde")])
def test_per_objective_weights_steer_brightness_and_motion(wan_wide_vae, mode, sampler):
    """Raising an objective's weight at inference raises that objective of the samples, for every sample.

    Measured (4 samples, 4 steps): brightness 0.538 unguided -> 0.543 with weights (1, 0) vs 0.536 with (0, 1);
    frame motion 0.0173 -> 0.0230 with (0, 1) vs 0.0166 with (1, 0) (nrg/ode; euphonium/dance-sde alike). The
    random Wan decoder's RMS norms bound its pixels, so brightness moves little, but the ordering is strict."""
    objectives = _objectives()
    guide = RewardGuidance(objectives, scale=5.0, mode=mode, normalize=True)

    def scores(g):
        traj = fa.sample(wan_wide_vae, PROMPTS, num_steps=4, sampler=sampler, guidance=g, num_images_per_prompt=2,
                         generator=gen(0))
        return objectives.scores(traj.images)

    base = scores(None)
    bright = scores(guide.with_weights({"brightness": 1.0, "frame-motion": 0.0}))
    moving = scores(guide.with_weights({"brightness": 0.0, "frame-motion": 1.0}))
    assert (bright["brightness"] > moving["brightness"] + 1e-3).all(), (bright, moving)
    assert (moving["frame-motion"] > bright["frame-motion"] * 1.1).all(), (bright, moving)
    assert bright["brightness"].mean() > base["brightness"].mean() + 2e-3
    assert moving["frame-motion"].mean() > base["frame-motion"].mean() * 1.15
    assert guide.weights == {"brightness": 1.0, "frame-motion": 1.0}  # with_weights made copies


# ----------------------------------------------------------------------------- 3. trainers
TRAINERS = {"grpo": (GRPOConfig, train_grpo, {"beta": 0.04, "clip_range": 1e-3}),
            "crd": (CRDConfig, train_crd, {"train_timesteps": 2, "sampling_decay": "0-0.5-0.0-0.5"}),
            "euphonium": (EuphoniumConfig, train_euphonium,
                          {"guide_scale": 5.0, "guide_normalize": True, "beta": 0.04, "clip_range": 1e-3,
                           "outcome_rewards": {"frame-motion": 1.0, f"{__name__}:Brightness": 0.5}}),
            "re-dmd": (DMDConfig, train_dmd, {"reward_beta": 1.0, "student_steps": 2, "ttur": 1})}


def _settings(task: str, tmp_path: Path, out: str, **kw) -> dict:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(VIDEO_PROMPTS) + "\n")
    base = {"task": task, "model": "tiny-wan", "reward": "frame-motion", "prompts": str(prompts),
            "eval_prompts": None, "epochs": 2, "groups_per_epoch": 2, "group_size": 2, "num_steps": 2,
            "rollout_batch_size": 4, "train_batch_size": 4, "lora_rank": 4, "lr": 1e-2, "save_every": 1,
            "progress": False, "log_with": "none", "out": str(tmp_path / out)}
    return {**base, **TRAINERS[task][2], **kw}


def _train(task: str, settings: dict):
    """Train and return the Run and the trainable parameters before training."""
    schema, train, _ = TRAINERS[task]
    seen = {}
    orig = loop.Run.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        seen["run"], seen["before"] = self, [p.detach().clone() for p in self.params]

    loop.Run.__init__ = init
    try:
        train(load_config(schema, settings), reward=FrameMotion(scale=100.0))
    finally:
        loop.Run.__init__ = orig
    return seen["run"], seen["before"]


def _records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if not k.startswith(("time/", "throughput/"))} for ln in lines]


def _same(a, b, where: str = "state") -> None:
    """Nested dicts/lists/tensors are equal bitwise."""
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("task", list(TRAINERS))
def test_trainer_on_video_trains_every_lora_weight_and_resumes_exactly(task, tmp_path):
    # two epochs: LoRA starts with B = 0, so A's first gradient is exactly zero
    run, before = _train(task, _settings(task, tmp_path, "full"))
    assert run.model.is_video and len(run.params) > 0 and all("lora_" in n for n in run.param_names)
    unchanged = [n for n, a, p in zip(run.param_names, before, run.params) if torch.equal(a, p.detach())]
    assert not unchanged, f"parameters that did not train: {unchanged[:5]}"
    records = _records(tmp_path / "full")
    losses = [v for r in records for k, v in r.items() if k.startswith("train/") and "loss" in k]
    assert losses and all(torch.isfinite(torch.tensor(losses))), records
    assert all(torch.isfinite(torch.tensor(r["reward/mean"])) for r in records)
    if task in ("grpo", "euphonium"):  # the first minibatch of each epoch is scored exactly on-policy
        assert all(r["train/onpolicy_ratio_dev"] == 0.0 for r in records)
    assert (tmp_path / "full" / "lora" / "pytorch_lora_weights.safetensors").exists()
    if task == "re-dmd":  # the few-step student samples video as trained
        student = fa.load_model(str(tmp_path / "full" / "student"))
        assert (student.default_num_steps, student.default_sampler) == (2, "cps") and student.is_video
        traj = fa.sample(student, VIDEO_PROMPTS[:1], height=16, width=16, num_frames=5, generator=gen(0))
        assert traj.latents.shape == (1, 3, 16, 2, 2, 2) and torch.isfinite(traj.images).all()
    # stop after epoch 1, resume: the same epoch-2 checkpoint and metrics, bitwise
    _train(task, _settings(task, tmp_path, "resumed", epochs=1))
    _train(task, _settings(task, tmp_path, "resumed", resume="latest"))
    assert _records(tmp_path / "resumed") == records
    load = lambda out: torch.load(tmp_path / out / "checkpoints" / "epoch-0002" / "state.pt",  # noqa: E731
                                  map_location="cpu", weights_only=False)
    got, ref = load("resumed"), load("full")
    for key in ("epoch", "step", "params", "optimizer", "algorithm"):
        _same(got[key], ref[key], key)


def test_configs_for_wan_load():
    for algo, (schema, _, _) in TRAINERS.items():
        cfg = load_config(schema, REPO / "configs" / algo / "wan.yaml")
        assert cfg.task == algo and cfg.model.startswith("Wan-AI/Wan2.1-T2V") and cfg.num_frames >= 33
    cfg = load_config(EuphoniumConfig, REPO / "configs" / "euphonium" / "wan.yaml")
    assert cfg.sampler == "dance-sde" and cfg.guide_window == [12, 16] and cfg.num_steps == 16
    assert cfg.process_rewards == {cfg.reward: 1.0} and cfg.finetune == "lora"


# ----------------------------------------------------------------------------- 4. evaluation output
def test_video_grid_tiles_frame_by_frame():
    videos = torch.rand(5, 3, 3, 8, 6, generator=gen(0))
    out = video_grid(videos, nrow=2)
    assert out.shape == (3, 3, 3 * 8 + 4 * 2, 2 * 6 + 3 * 2)  # 3 rows x 2 columns with 2 px padding
    for t in range(3):
        assert torch.equal(out[t], grid(videos[:, t], nrow=2))
    assert video_grid(videos[:2]).shape == (3, 3, 8 + 4, 2 * 6 + 6)  # default: one row up to 4 videos
    with pytest.raises(ValueError, match="videos must be a \\(B, F, C, H, W\\)"):
        video_grid(videos[:, 0])


def test_save_samples_writes_an_animated_grid_for_video(tmp_path):
    from PIL import Image

    videos = torch.rand(3, 4, 3, 8, 8, generator=gen(1))
    paths = save_samples(videos, tmp_path, scale=2)
    assert [Path(p).name for p in paths] == ["sample_000.gif", "sample_001.gif", "sample_002.gif"]
    with Image.open(tmp_path / "grid.gif") as gif:
        assert gif.n_frames == 4 and gif.size == (2 * (3 * 8 + 4 * 2), 2 * (8 + 4))
    assert (tmp_path / "grid.png").exists()
    save_samples(videos[:, 0], tmp_path / "images")
    assert not (tmp_path / "images" / "grid.gif").exists()  # images: grid.png only


def test_video_run_evaluation_writes_animated_grids_and_the_video_verifier(tmp_path):
    """Evaluation of a video run: one GIF per evaluation (frames of the held-out clips tiled in sync), its first
    frame as the tracked image, and ``shapes-video`` among the default eval rewards for the video world's
    captions (the image verifier is not used on clips)."""
    from PIL import Image

    settings = _settings("crd", tmp_path, "eval", eval_prompts=str(tmp_path / "prompts.txt"), eval_num=2,
                         eval_steps=2, epochs=1, log_with="tensorboard")
    run, _ = _train("crd", settings)
    out = tmp_path / "eval"
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch-0000.gif", "epoch-0001.gif"]
    with Image.open(out / "samples" / "epoch-0001.gif") as gif:
        assert gif.n_frames == 5 and gif.size == (8 * (2 * 16 + 6), 8 * (16 + 4))  # 2 tiles, upscaled to 128 px
    assert run.last_grid.shape == (3, 16 + 4, 2 * 16 + 6)  # the first frame, logged to TensorBoard
    assert any((out / "tensorboard").iterdir())
    assert set(run.eval_rewards()) == {"frame-motion", "shapes-video", "shapes-video-motion"}
    last = _records(out)[-1]
    assert {"eval/frame-motion", "eval/shapes-video", "eval/shapes-video/motion", "eval/shapes-video/pair",
            "eval/shapes-video-motion"} <= set(last)
    assert last["eval/shapes-video-motion"] >= 0
    assert "samples/epoch-0001.gif" in (out / "report.md").read_text()


def test_large_videos_are_downscaled_for_the_eval_grid():
    videos = torch.rand(2, 3, 3, 480, 832)
    small = loop._thumbnails(videos, 256)
    assert small.shape == (2, 3, 3, 148, 256)
    assert torch.allclose(small.mean(), videos.mean(), atol=1e-3)  # area averaging
    assert torch.equal(loop._thumbnails(videos[..., :64, :64], 256), videos[..., :64, :64])


# ----------------------------------------------------------------------------- 5. default eval rewards
def test_default_eval_rewards_follow_the_model_kind_and_the_prompt_world():
    pick = loop.default_eval_rewards
    assert pick("jpeg-compressibility", "shapes", is_video=False) == ["jpeg-compressibility", "shapes-geneval",
                                                                     "shapes-clip"]
    assert pick("shapes-clip", "shapes", is_video=False) == ["shapes-clip", "shapes-geneval"]
    assert pick("motion", "shapes", is_video=True) == ["motion"]  # no image verifier on clips
    assert pick("motion", "shapes-video", is_video=True) == ["motion", "shapes-video", "shapes-video-motion"]
    assert pick("shapes-video", "shapes-video", is_video=True) == ["shapes-video", "shapes-video-motion"]
    assert pick("motion", "shapes-video", is_video=False) == ["motion"]
    assert pick("motion", None, is_video=True) == ["motion"]


def test_prompt_worlds():
    assert world_of(PROMPTS) == ("shapes", ["single", "counting"])
    assert world_of(VIDEO_PROMPTS) == ("shapes-video", ["motion", "pair"])
    assert world_of(PROMPTS[:1] + VIDEO_PROMPTS[:1]) == (None, None)  # mixed worlds: neither
    assert world_of(["a cat on a sofa"]) == (None, None) and world_of([]) == (None, None)


def test_video_world_prompt_sources():
    from flowalign.trainers.data import load_prompts

    train = load_prompts("shapes-video-train", 50)
    assert len(train) == 50 and world_of(train)[0] == "shapes-video"
    assert set(load_prompts("shapes-video-test")).isdisjoint(load_prompts("shapes-video-train"))  # held out
