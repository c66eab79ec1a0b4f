"""Streaming (chunked causal, rolling EMA-Sink KV cache) vs full-sequence sampling of the same video on a Wan model.

Both make ``num_chunks * chunk_frames`` latent frames from the same noise with the same Euler ODE steps and no CFG
(distilled causal students are CFG-free): ``flowalign.sampling.streaming.stream`` (each chunk: ``steps`` forwards
over the chunk's tokens plus one cache-write forward, attending to at most ``sinks + window`` cached frames) and
``fa.sample`` (``steps`` forwards over the whole sequence with full attention). The decode is left out of both.

1. Speed: video frames per second of generation, streaming / full sequence, interleaved repetitions, medians;
   also the latency to the first chunk (when streaming can start showing frames).
2. Memory as the video grows: peak memory above the resident state during the call, on CPU the peak-RSS
   increase (``VmHWM`` reset through ``/proc/self/clear_refs``, glibc told to return freed blocks at once), on
   GPU the allocator's peak. The streaming cache's own bytes are exact.

Model: ``--model small`` (default) is a random Wan 2.1 transformer of 4 layers, 4 heads x 32 dims (1.3M
parameters), with the tiny pipeline's VAE and text encoder, at 128x128 (64 tokens per latent frame) and 32 text
tokens (a real Wan has 1560 video tokens per latent frame against 512 text tokens, so self-attention dominates;
at the pipeline's 512 text tokens this toy would mostly measure cross-attention); ``--model tiny`` is the tiny
pipeline at 32x32 (4 tokens per frame, 512 text tokens). Per-forward overhead favours the full sequence (one
call per step instead of one per chunk and step), full attention's quadratic cost favours streaming as the video
grows.

Usage: python benchmarks/bench_streaming.py [--model small|tiny] [--device cpu] [--steps 4] [--reps 3]
Writes benchmarks/results/streaming.json.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import flowalign as fa
from flowalign.sampling.streaming import stream

RESULTS = Path(__file__).parent / "results"
PROMPTS = ["a red circle moving to the right"]


def build(name: str, device: str):
    from diffusers import WanPipeline, WanTransformer3DModel

    from flowalign.models import tiny

    pipe = tiny.build("tiny-wan")
    if name == "small":
        torch.manual_seed(0)
        tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16,
                                   out_channels=16, text_dim=32, freq_dim=256, ffn_dim=512, num_layers=4,
                                   cross_attn_norm=True, qk_norm="rms_norm_across_heads").eval()
        pipe = WanPipeline(**{**pipe.components, "transformer": tr})
    model = fa.load_model(pipe, device=device)
    if name == "small":
        model.max_sequence_length = 32
    return model, (128, 128) if name == "small" else (32, 32)


# ----------------------------------------------------------------------------------------------- memory probes
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: big blocks are mmapped, so freeing returns them
        return libc
    except OSError:
        return None


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def peak_mib(fn, device: str, libc) -> float | None:
    """Peak memory above the state before ``fn()`` (MiB): CUDA allocator peak, or on Linux the peak-RSS increase."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if libc is not None:
        libc.malloc_trim(0)
    try:
        base = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    fn()
    return (_status_kib("VmHWM") - base) / 1024


# ----------------------------------------------------------------------------------------------- runs
def make_runs(model, hw, args, num_chunks: int):
    frames = num_chunks * args.chunk
    noise = model.noise(1, *hw, (frames - 1) * model.temporal_factor + 1, generator=torch.Generator().manual_seed(0))
    cond = model.encode(PROMPTS, guidance_scale=1.0)
    out = {}

    def streaming():
        out["stream"] = stream(model, PROMPTS, num_chunks=num_chunks, chunk_frames=args.chunk, num_steps=args.steps,
                               window=args.window, sinks=args.sinks, sink_ema=args.alpha, guidance_scale=1.0,
                               noise=noise, cond=cond, decode=False)

    def full():
        fa.sample(model, PROMPTS, num_steps=args.steps, sampler="ode", guidance_scale=1.0, height=hw[0],
                  width=hw[1], num_frames=(frames - 1) * model.temporal_factor + 1, latents=noise, cond=cond,
                  decode=False)

    return streaming, full, out


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def speed(model, hw, args, num_chunks: int) -> dict:
    streaming, full, out = make_runs(model, hw, args, num_chunks)
    streaming(), full()  # warm-up
    times = {"stream": [], "full": []}
    first = []
    for _ in range(args.reps):  # interleaved
        times["stream"].append(timed(streaming, args.device))
        first.append(out["stream"].chunk_seconds[0])
        times["full"].append(timed(full, args.device))
    frames = out["stream"].num_frames
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"num_chunks": num_chunks, "video_frames": frames, "latent_frames": num_chunks * args.chunk,
            "seconds": times, "seconds_median": med,
            "fps": {k: frames / v for k, v in med.items()},
            "fps_ratio_stream_over_full": med["full"] / med["stream"],
            "first_chunk_latency_s": statistics.median(first)}


def memory(model, hw, args) -> list[dict]:
    libc = None if args.device.startswith("cuda") else _libc()
    rows = []
    for n in args.memory_chunks:
        streaming, full, out = make_runs(model, hw, args, n)
        row = {"num_chunks": n, "latent_frames": n * args.chunk}
        row["stream_peak_mib"] = peak_mib(streaming, args.device, libc)
        row["full_peak_mib"] = peak_mib(full, args.device, libc)
        row["stream_cache_mib"] = max(out["stream"].cache_bytes) / 2**20
        row["stream_context_frames_max"] = max(out["stream"].context_frames)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", choices=["small", "tiny"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=4, help="Euler steps per chunk (and for the full sequence)")
    p.add_argument("--chunk", type=int, default=3, help="latent frames per chunk")
    p.add_argument("--window", type=int, default=6)
    p.add_argument("--sinks", type=int, default=3)
    p.add_argument("--alpha", type=float, default=0.999)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--speed-chunks", type=int, nargs="+", default=[8, 16])
    p.add_argument("--memory-chunks", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: least noisy on a shared machine)")
    p.add_argument("--out", default=str(RESULTS / "streaming.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, hw = build(args.model, args.device)
    tr = model.transformer
    result = {
        "model": args.model, "device": args.device, "height": hw[0], "width": hw[1],
        "transformer_params_m": sum(q.numel() for q in tr.parameters()) / 1e6,
        "tokens_per_latent_frame": (hw[0] // model.size_multiple) * (hw[1] // model.size_multiple),
        "steps": args.steps, "chunk_frames": args.chunk, "window": args.window, "sinks": args.sinks,
        "sink_ema": args.alpha, "guidance_scale": 1.0, "threads": args.threads, "torch": torch.__version__,
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }
    result["speed"] = [speed(model, hw, args, n) for n in args.speed_chunks]
    result["memory"] = memory(model, hw, args)  # after the speed runs: warmed up
    result["wall_seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    print(f"{args.model} Wan ({result['transformer_params_m']:.2f}M), {hw[0]}x{hw[1]}, {args.steps} steps, chunk "
          f"{args.chunk}, window {args.window}, sinks {args.sinks}, {args.device}, {args.threads} thread(s)")
    print("| latent frames (video frames) | streaming fps | full-sequence fps | ratio | first chunk s | full s |")
    print("|---|---|---|---|---|---|")
    for s in result["speed"]:
        print(f"| {s['latent_frames']} ({s['video_frames']}) | {s['fps']['stream']:.1f} | {s['fps']['full']:.1f} | "
              f"**{s['fps_ratio_stream_over_full']:.2f}** | {s['first_chunk_latency_s']:.3f} | "
              f"{s['seconds_median']['full']:.3f} |")
    print("| latent frames | streaming peak MiB | full-sequence peak MiB | streaming cache MiB |")
    print("|---|---|---|---|")
    for r in result["memory"]:
        fmt = lambda x: "n/a" if x is None else f"{x:.1f}"  # noqa: E731
        print(f"| {r['latent_frames']} | {fmt(r['stream_peak_mib'])} | {fmt(r['full_peak_mib'])} | "
              f"{r['stream_cache_mib']:.2f} |")
    print(f"wrote {out} ({result['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
