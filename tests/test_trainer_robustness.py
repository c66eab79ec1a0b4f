"""Trainer robustness (flowalign.trainers.loop): a run SIGKILLed mid-training and resumed ends exactly where the
uninterrupted run ends; a broken reward, a bad prompt file or a full disk fails loudly and leaves the last
checkpoint usable; group advantages under a 2-process launch use every process's rewards; bad configs are
rejected with the key named. Everything runs on CPU with the tiny SD3 pipeline."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowalign.config import ConfigError, load_config
from flowalign.functional.advantages import group_advantages
from flowalign.rewards.base import Reward
from flowalign.trainers import loop
from flowalign.trainers.crd import CRDConfig, train_crd
from flowalign.trainers.dmd import DMDConfig, train_dmd
from flowalign.trainers.flash_dmd import FlashDMDConfig, train_flash_dmd
from flowalign.trainers.grpo import GRPOConfig, train_grpo

REPO = Path(__file__).resolve().parents[1]
TRAINERS = {"grpo": (GRPOConfig, train_grpo), "crd": (CRDConfig, train_crd), "dmd": (DMDConfig, train_dmd),
            "flash-dmd": (FlashDMDConfig, train_flash_dmd)}
# settings that make more state matter on resume: GRPO's EMA and a learning-rate schedule, CRD's old and (active)
# sampling snapshots, DMD's critic and its optimizer
EXTRA = {"grpo": {"ema_decay": 0.5, "lr_schedule": "cosine", "lr_warmup_epochs": 1, "lr_final": 0.5},
         "crd": {"train_timesteps": 2, "sampling_decay": "0-0.5-0.0-0.5"},
         "dmd": {"student_steps": 2, "ttur": 2, "group_size": 1, "ema_decay": 0.5},
         "flash-dmd": {"student_steps": 2, "group_size": 1, "dm_sigma_min": 0.9, "disc": "critic", "real_pool": 4,
                       "rl_every": 2, "rl_candidates": 2, "critic_ema": 0.9}}
LORA_FILE = "lora/pytorch_lora_weights.safetensors"


# ----------------------------------------------------------------------------- helpers
def _prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a cat on a sofa\na lighthouse at dusk\n")  # not shapes captions: no shapes eval rewards
    return path


def _settings(task: str, tmp_path: Path, out: Path, **overrides) -> dict:
    prompts = str(_prompt_file(tmp_path))
    return {"model": "tiny-sd3", "reward": "jpeg-compressibility", "prompts": prompts, "eval_prompts": None,
            "eval_num": 2, "eval_steps": 2, "epochs": 3, "groups_per_epoch": 2, "group_size": 2, "num_steps": 2,
            "rollout_batch_size": 4, "train_batch_size": 4, "lora_rank": 4, "progress": False, "threads": 1,
            "log_with": "none", "device": "cpu", "save_every": 1, "seed": 0, "out": str(out),
            **EXTRA[task], **overrides}


def _train(task: str, settings: dict, reward=None) -> dict:
    schema, train = TRAINERS[task]
    return train(load_config(schema, settings), reward=reward)


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _records(out: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock timings (the only values allowed to differ between runs)."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if not k.startswith(("time/", "throughput/"))} for ln in lines]


def _load_state(folder: Path) -> dict:
    return torch.load(folder / "state.pt", map_location="cpu", weights_only=False)


def _assert_same(a, b, where: str = "state") -> None:
    """Nested dicts/lists/tensors are equal bitwise (floats exactly)."""
    assert type(a) is type(b), where
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs by up to {(a.double() - b.double()).abs().max().item():.3g}"
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        pass  # both NaN
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- 1. resume after a real SIGKILL
KILLED_RUN = '''
import json, sys, time
from pathlib import Path

import torch

from flowalign.config import load_config
from flowalign.trainers import loop
from flowalign.trainers.crd import CRDConfig, train_crd
from flowalign.trainers.dmd import DMDConfig, train_dmd
from flowalign.trainers.grpo import GRPOConfig, train_grpo

task, settings_path, kill_point, marker = sys.argv[1:5]


def stall():  # tell the test where we are, then wait for its SIGKILL
    Path(marker).write_text(kill_point)
    time.sleep(600)


if kill_point == "rollout":  # inside the third epoch: its rollouts are drawn, not yet scored
    score = loop.Run.score

    def stalling_score(self, traj):
        if self.epoch == 2:
            stall()
        return score(self, traj)

    loop.Run.score = stalling_score
else:  # "checkpoint": the third epoch is done and logged, its checkpoint is half written
    save = torch.save

    def stalling_save(obj, f, *args, **kwargs):
        if "epoch-0003" in str(f):
            Path(f).write_bytes(b"half a checkpoint")
            stall()
        return save(obj, f, *args, **kwargs)

    loop.torch.save = stalling_save

from flowalign.trainers.flash_dmd import FlashDMDConfig, train_flash_dmd

schema, train = {"grpo": (GRPOConfig, train_grpo), "crd": (CRDConfig, train_crd), "dmd": (DMDConfig, train_dmd),
                 "flash-dmd": (FlashDMDConfig, train_flash_dmd)}[task]
train(load_config(schema, json.loads(Path(settings_path).read_text())))
sys.exit("the run finished without being killed")
'''


def _run_until_killed(task: str, settings: dict, kill_point: str, tmp_path: Path) -> None:
    """Train in a subprocess and SIGKILL it once the epoch-0002 checkpoint is complete and it stalls at
    ``kill_point`` in the third epoch."""
    script, settings_path = tmp_path / "killed_run.py", tmp_path / "killed_settings.json"
    marker, log = tmp_path / "stalled", tmp_path / "killed_run.log"
    script.write_text(KILLED_RUN)
    settings_path.write_text(json.dumps(settings))
    ckpt = Path(settings["out"]) / loop.CKPT_DIR
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, str(script), task, str(settings_path), kill_point, str(marker)],
                                cwd=tmp_path, env=_env(), stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not ((ckpt / "epoch-0002" / "state.pt").exists() and marker.exists()):
            if proc.poll() is not None:
                pytest.fail(f"the run to kill exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the run to kill did not reach epoch 2 in time:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("task, kill_point", [("grpo", "rollout"), ("grpo", "checkpoint"), ("crd", "rollout"),
                                              ("crd", "checkpoint"), ("dmd", "checkpoint"),
                                              ("flash-dmd", "checkpoint")])
def test_run_killed_after_epoch_2_and_resumed_matches_uninterrupted_run(task, kill_point, tmp_path):
    prompts = str(_prompt_file(tmp_path))
    ref_out, out = tmp_path / "uninterrupted", tmp_path / "killed"
    _train(task, _settings(task, tmp_path, ref_out, eval_prompts=prompts))

    settings = _settings(task, tmp_path, out, eval_prompts=prompts)
    _run_until_killed(task, settings, kill_point, tmp_path)
    ckpt = out / loop.CKPT_DIR
    assert (ckpt / "latest").read_text().strip() == "epoch-0002"
    assert not (ckpt / "epoch-0003").exists()
    if kill_point == "checkpoint":  # killed after logging epoch 3 and while writing its checkpoint
        assert (ckpt / "epoch-0003.tmp" / "state.pt").exists()
        assert [r["epoch"] for r in _records(out)][-1] == 3
    else:
        assert [r["epoch"] for r in _records(out)][-1] == 2

    _train(task, dict(settings, resume="latest"))

    assert _records(out) == _records(ref_out)
    assert [r["epoch"] for r in _records(out)] == [0, 1, 2, 3]  # epoch 0: the evaluation before training
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch-0002", "epoch-0003", "latest"]  # no *.tmp left
    got, ref = _load_state(ckpt / "epoch-0003"), _load_state(ref_out / loop.CKPT_DIR / "epoch-0003")
    assert (got["epoch"], got["step"]) == (ref["epoch"], ref["step"]) == (3, 4 if task == "flash-dmd" else 3)  # + 1 RL
    for key in ("params", "optimizer", "ema", "algorithm", "config"):
        _assert_same(got[key], ref[key], key)
    _assert_same(load_file(out / LORA_FILE), load_file(ref_out / LORA_FILE), "exported LoRA")
    ref_params = list(ref["params"].values())
    assert any(not torch.equal(p, q) for p, q in zip(ref_params, _load_state(ckpt / "epoch-0002")["params"].values()))


# ----------------------------------------------------------------------------- 2. a reward that breaks
class BreakingReward(Reward):
    """Mean brightness; from its ``fail_from``-th call on it returns NaN or one score too few."""

    name = "breaking-brightness"
    differentiable = False
    uses_prompts = False

    def __init__(self, failure: str | None = None, fail_from: int = 2, checkpoints: Path | None = None):
        super().__init__()
        self.failure, self.fail_from, self.checkpoints = failure, fail_from, checkpoints
        self.calls = 0
        self.digest_when_broken = None

    def score(self, images, prompts):
        self.calls += 1
        s = images.float().mean(dim=(1, 2, 3))
        if self.failure is None or self.calls < self.fail_from:
            return s
        self.digest_when_broken = _tree_digest(self.checkpoints)
        if self.failure == "nan":
            return torch.where(torch.arange(len(s)) == 1, torch.full_like(s, float("nan")), s)
        return s[:-1]


@pytest.mark.parametrize("failure, message", [("nan", "non-finite"), ("shape", "returned shape (3,)")])
def test_broken_reward_names_itself_and_keeps_the_last_checkpoint(failure, message, tmp_path):
    out = tmp_path / "run"
    settings = _settings("grpo", tmp_path, out)
    ckpt = out / loop.CKPT_DIR
    reward = BreakingReward(failure, fail_from=2, checkpoints=ckpt)  # one call per epoch: epoch 2 breaks
    with pytest.raises(ValueError) as e:
        _train("grpo", settings, reward=reward)
    assert "breaking-brightness" in str(e.value) and message in str(e.value)
    assert reward.calls == 2

    assert loop.latest_checkpoint(out) == ckpt / "epoch-0001"
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch-0001", "latest"]
    assert _tree_digest(ckpt) == reward.digest_when_broken  # untouched by the failing epoch
    state = _load_state(ckpt / "epoch-0001")
    assert (state["epoch"], state["step"]) == (1, 1)
    assert all(torch.isfinite(p).all() for p in state["params"].values())
    assert set(load_file(ckpt / "epoch-0001" / LORA_FILE))

    # the checkpoint is usable: a run with a working reward resumes from it and finishes
    _train("grpo", dict(settings, resume="latest", epochs=2), reward=BreakingReward())
    assert [r["epoch"] for r in _records(out)] == [1, 2]
    assert loop.latest_checkpoint(out) == ckpt / "epoch-0002"


# ----------------------------------------------------------------------------- 3. prompt files
@pytest.mark.parametrize("key", ["prompts", "eval_prompts"])
def test_missing_prompt_file_names_it(key, tmp_path):
    missing = tmp_path / "no-such-prompts.txt"
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="no-such-prompts.txt"):
        _train("grpo", _settings("grpo", tmp_path, out, **{key: str(missing)}))
    assert not out.exists()


@pytest.mark.parametrize("bad_line", ['{"prompt": "an unclosed', '{"text": "no prompt key"}', '["a list"]'])
def test_malformed_jsonl_names_the_line(bad_line, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a cat on a sofa"}\n\n' + bad_line + '\n{"prompt": "a dog"}\n')
    with pytest.raises(ValueError) as e:
        _train("grpo", _settings("grpo", tmp_path, tmp_path / "run", prompts=str(path)))
    assert f"{path}:3:" in str(e.value)  # the file's own line number (blank lines count)
    assert bad_line[:20] in str(e.value)


# ----------------------------------------------------------------------------- 4. full disk while checkpointing
def test_full_disk_on_second_checkpoint_keeps_first_and_resume_finishes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    ckpt = out / loop.CKPT_DIR
    settings = _settings("grpo", tmp_path, out)
    real_save, calls = torch.save, []

    def full_disk_save(obj, f, *args, **kwargs):
        calls.append(str(f))
        if len(calls) == 2:
            Path(f).write_bytes(b"\0" * 64)  # the disk filled up part-way through the file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(loop.torch, "save", full_disk_save)
        with pytest.raises(OSError) as e:
            _train("grpo", settings)
    assert len(calls) == 2 and "epoch-0002.tmp" in calls[1]
    msg = str(e.value)
    assert str(ckpt / "epoch-0001") in msg and "intact" in msg and "No space left on device" in msg
    assert "resume=latest" in msg
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC

    assert list(out.rglob("*.tmp")) == []
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch-0001", "latest"]
    assert loop.latest_checkpoint(out) == ckpt / "epoch-0001"
    state = _load_state(ckpt / "epoch-0001")
    assert (state["epoch"], state["step"]) == (1, 1)
    assert set(load_file(ckpt / "epoch-0001" / LORA_FILE))

    assert torch.save is real_save
    _train("grpo", dict(settings, resume="latest"))
    assert [r["epoch"] for r in _records(out)] == [1, 2, 3]  # epoch 2's record of the failed run is not doubled
    assert loop.latest_checkpoint(out) == ckpt / "epoch-0003"
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch-0002", "epoch-0003", "latest"]
    assert list(out.rglob("*.tmp")) == []
    assert (out / LORA_FILE).exists()


# ----------------------------------------------------------------------------- 5. two processes
DDP_RUN = '''
import json, sys
from pathlib import Path

from flowalign.config import load_config
from flowalign.trainers.grpo import GRPOConfig, train_grpo

train_grpo(load_config(GRPOConfig, json.loads(Path(sys.argv[1]).read_text())))
'''


def test_two_process_launch_gathers_rewards_for_group_advantages(tmp_path):
    # `accelerate launch --cpu --num_processes 2` starts ONE process with accelerate 1.x: --cpu always takes the
    # "simple" launcher, which spawns several processes only through MPI (--mpirun_hostfile). --multi_gpu takes
    # the torchrun launcher; the script's device=cpu (and CUDA_VISIBLE_DEVICES="") makes it DDP over gloo on CPU.
    out = tmp_path / "run"
    settings = _settings("grpo", tmp_path, out, epochs=1, save_rollout_stats=True, rollout_batch_size=2,
                         train_batch_size=2, global_std=True)  # global std: each advantage needs both ranks
    script, settings_path = tmp_path / "ddp_run.py", tmp_path / "ddp_settings.json"
    script.write_text(DDP_RUN)
    settings_path.write_text(json.dumps(settings))
    env = dict(_env(), HF_HOME=str(tmp_path / "hf_home"))  # no user accelerate config
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script), str(settings_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    files = sorted(p.name for p in (out / "rollouts").iterdir())
    assert files == ["epoch-0000-rank0.pt", "epoch-0000-rank1.pt"], files
    ranks = [torch.load(out / "rollouts" / f, weights_only=False) for f in files]
    rewards = torch.cat([r["rewards"] for r in ranks])
    groups = torch.cat([r["groups"] for r in ranks])
    assert rewards.shape == (4,) and groups.tolist() == [0, 0, 1, 1]  # one prompt group per rank
    expected = group_advantages(rewards, groups, global_std=True, clip=5.0)
    for i, r in enumerate(ranks):
        assert torch.equal(r["all_rewards"], rewards) and torch.equal(r["all_groups"], groups)
        assert torch.equal(r["advantages"], expected[2 * i:2 * i + 2]), (i, r["advantages"], expected)
    # the two ranks drew their own noise, and the gathered statistics differ from per-rank ones
    assert not torch.equal(ranks[0]["rewards"], ranks[1]["rewards"])
    local = [group_advantages(r["rewards"], r["groups"], global_std=True, clip=5.0) for r in ranks]
    assert not torch.allclose(torch.cat(local), expected)
    assert [r["epoch"] for r in _records(out)] == [1]  # only rank 0 logs
    assert loop.latest_checkpoint(out) == out / loop.CKPT_DIR / "epoch-0001"


# ----------------------------------------------------------------------------- 6. config validation
def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError) as e:
        load_config(CRDConfig, {"grop_size": 4})
    assert "'grop_size'" in str(e.value) and "group_size" in str(e.value)
    with pytest.raises(ConfigError, match="train_timestep"):
        load_config(CRDConfig, {}, ["train_timestep=2"])


def test_crd_train_batch_size_must_hold_whole_groups():
    with pytest.raises(ConfigError) as e:
        load_config(CRDConfig, {"group_size": 4, "train_batch_size": 6})
    assert "train_batch_size" in str(e.value) and "group_size=4" in str(e.value)
    assert load_config(CRDConfig, {"group_size": 4, "train_batch_size": 8}).train_batch_size == 8
    assert load_config(GRPOConfig, {"group_size": 4, "train_batch_size": 6}).train_batch_size == 6  # GRPO: any


def test_reward_kwargs_reach_the_reward(tmp_path):
    """``reward_kwargs`` are the training reward's constructor keywords: a worker pool trains; a keyword the
    reward does not take fails before any rollout, naming the reward and the keyword."""
    prompts = tmp_path / "shapes.txt"
    prompts.write_text("a red circle\nthree green triangles\n")
    settings = _settings("grpo", tmp_path, tmp_path / "run", prompts=str(prompts), epochs=1,
                         reward="shapes-geneval-soft", reward_kwargs={"workers": 2})
    train_grpo(load_config(GRPOConfig, settings))
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= epochs[-1]["reward/mean"] <= 1 and (tmp_path / "run" / LORA_FILE).exists()
    settings.update(reward_kwargs={"bogus": 1}, out=str(tmp_path / "bad"))
    with pytest.raises(TypeError, match="shapes-geneval-soft.*bogus"):
        train_grpo(load_config(GRPOConfig, settings))
    assert not (tmp_path / "bad" / "checkpoints").exists()
