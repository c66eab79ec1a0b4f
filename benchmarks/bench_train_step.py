"""One GRPO, CRD and DMD optimizer step at SD3.5-medium size, random weights: peak memory and step time.

The generator is an SD3 pipeline with the SD3.5-medium transformer config (2.5B parameters, random weights;
``bench_sampling.build``), trained the way ``configs/{grpo,crd}/sd35m.yaml`` train it: bf16 frozen weights and
autocast, a LoRA r32/alpha 64 kept in fp32, gradient checkpointing, 512x512, 10 rollout steps at CFG 4.5.
The text encoders are small stand-ins with the real output widths and T5 is left out: they are frozen and run
once per prompt, so they do not change the step's cost.

Each epoch draws one prompt group of ``--group`` samples (rollout) and takes one optimizer step on all of them
(GRPO: the PPO + KL loss on every one of the 10 denoising steps; CRD: ``--crd-timesteps`` noise levels, the
paper's 20). The first epoch warms up; the second is measured. Peak memory is the CUDA allocator's peak within
the measured epoch (weights included) and above the resident weights.

Usage: python benchmarks/bench_train_step.py [--device cuda] [--size sd35m|small] [--tasks grpo,crd]
       [--no-checkpointing]
Writes benchmarks/results/train_step_<device>_<size>[_<tasks>].json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_sampling import PROMPTS, RESULTS, build  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(task: str, args, tmp: Path) -> dict:
    from flowalign.rewards import load as load_reward
    from flowalign.trainers import crd, dmd, grpo
    from flowalign.trainers.loop import Run

    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):  # random weights initialised on the target device (fast on GPU)
        pipe, hw = build(args.size, dtype, args.device)
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    common = dict(model="bench", reward="jpeg-compressibility", prompts=str(prompts), eval_prompts=None,
                  epochs=2, groups_per_epoch=1, group_size=args.group, rollout_batch_size=args.group,
                  train_batch_size=args.group, num_steps=10, guidance_scale=4.5, height=hw, width=hw,
                  finetune="lora", lora_rank=32, lora_alpha=64, gradient_checkpointing=not args.no_checkpointing,
                  mixed_precision="bf16" if args.device.startswith("cuda") and dtype == torch.bfloat16 else "no",
                  dtype=args.dtype, device=args.device, save_every=0, log_with="none", progress=False,
                  out=str(tmp / task))
    if task == "grpo":
        cfg = grpo.GRPOConfig(task="grpo", beta=0.04, clip_range=1e-4, **common)
        algorithm = grpo.GRPO(cfg)
    elif task == "crd":
        cfg = crd.CRDConfig(task="crd", train_timesteps=args.crd_timesteps, timestep_shift=3.0, **common)
        algorithm = crd.CRD(cfg)
    else:  # dmd (full critic) or dmd-lora-critic: a 4-step student, 5 critic updates per student update
        cfg = dmd.DMDConfig(task="dmd", student_steps=4, ttur=5, timestep_shift=3.0, group_size=args.group,
                            critic_finetune="lora" if task.endswith("lora-critic") else "full",
                            **{k: v for k, v in common.items() if k != "group_size"})
        algorithm = dmd.DMD(cfg)
    run = Run(cfg, algorithm, model=pipe, reward=load_reward("jpeg-compressibility"))
    n_lora = sum(p.numel() for p in run.params)
    n_total = sum(p.numel() for p in run.model.transformer.parameters())
    out = {"task": task, "transformer_params": n_total, "trainable_params": n_lora}
    for epoch in range(2):
        _sync(args.device)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        step0, t0 = run.step, time.perf_counter()
        metrics = algorithm.epoch(run, epoch, *run.generators(epoch))
        _sync(args.device)
        wall = time.perf_counter() - t0
    out.update({"optimizer_steps": run.step - step0, "epoch_s": wall, "samples_per_step": args.group,
                "loss_finite": all(torch.isfinite(torch.tensor(float(v))).item()
                                   for k, v in metrics.items() if k.startswith("train/"))})
    if task.startswith("dmd"):  # one epoch = ttur critic updates (each on fresh 4-step student samples) + 1 student
        out.update({"critic_updates_s": metrics["time/critic_s"], "student_update_s": metrics["time/student_s"],
                    "critic_trainable_params": sum(p.numel() for p in algorithm.critic_params.values())})
    else:
        out.update({"rollout_s": metrics["time/rollout_s"],
                    "train_step_s": metrics["time/train_s"] / max(1, run.step - step0)})
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
        out.update({"resident_gib": resident / 2**30, "peak_gib": peak / 2**30,
                    "peak_above_resident_gib": (peak - resident) / 2**30})
    del run, pipe, algorithm
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="small", choices=["small", "sd35m"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--group", type=int, default=4, help="samples per prompt group = per optimizer step")
    p.add_argument("--crd-timesteps", type=int, default=20)
    p.add_argument("--tasks", default="grpo,crd", help="comma-separated: grpo, crd, dmd, dmd-lora-critic")
    p.add_argument("--no-checkpointing", action="store_true")
    args = p.parse_args()
    result = {"device": args.device, "size": args.size, "dtype": args.dtype, "group": args.group,
              "gradient_checkpointing": not args.no_checkpointing, "torch": torch.__version__,
              "machine": platform.machine(),
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            r = measure(task, args, Path(tmp))
            print(json.dumps(r), flush=True)
            result["runs"].append(r)
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = ("" if args.tasks == "grpo,crd" else "_" + args.tasks.replace(",", "_")) + (
        "_nockpt" if args.no_checkpointing else "")
    path = RESULTS / f"train_step_{args.device.split(':')[0]}_{args.size}{suffix}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
