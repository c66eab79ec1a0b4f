"""The ``flowalign`` command: ``flowalign sample | demo | train | eval | zoo | label | models``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EPILOG = """examples:
  flowalign sample --model tiny-sd3 --prompt "a red circle" --steps 8 --out out/tiny
  flowalign sample --model stabilityai/stable-diffusion-3.5-medium --prompt "a cat" --sampler flow-sde \\
      --eta 0.7 --cfg 4.5 --dtype bfloat16 --out out/sd35
  flowalign demo --out runs/demo
"""


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="Sample a model (ODE or SDE) and write images/videos plus settings.json.",
                       description="Sample a model and write PNGs (GIF/MP4 for video), a grid and settings.json.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--config", help="YAML file with sample settings (keys: see `flowalign sample --help-config`).")
    p.add_argument("--model", help="Bundled name (tiny-sd3, tiny-flux, tiny-wan), local diffusers dir or hub id.")
    p.add_argument("--prompt", action="append", dest="prompts", help="A prompt (repeat for several).")
    p.add_argument("--prompts-file", help="Text file with one prompt per line.")
    p.add_argument("--steps", type=int, dest="num_steps",
                   help="Number of sampling steps (default: the model's own, 20 or a distilled student's).")
    p.add_argument("--sampler", help="ode | flow-sde | dance-sde | cps (default: the model's own, ode or a distilled "
                   "student's).")
    p.add_argument("--eta", type=float, help="SDE noise level (default: the sampler's own, 0.7/0.3/0.8).")
    p.add_argument("--cfg", type=float, dest="guidance_scale", help="Guidance scale (default: the model's own).")
    p.add_argument("--height", type=int, help="Height in pixels (default: the model's native size).")
    p.add_argument("--width", type=int, help="Width in pixels (default: the model's native size).")
    p.add_argument("--num-frames", type=int, help="Frames per video (video models).")
    p.add_argument("--num-images-per-prompt", type=int, help="Samples per prompt (default 1).")
    p.add_argument("--seed", type=int, help="Random seed (default 0).")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available).")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default float32).")
    p.add_argument("--guide", action="append", metavar="REWARD[=WEIGHT]",
                   help="Reward-gradient guidance by a differentiable reward (repeat for several objectives).")
    p.add_argument("--guide-scale", type=float, help="Guidance strength (default 1).")
    p.add_argument("--guide-mode", help="nrg (Flow-NRG, any sampler) or euphonium (SDE drift) (default nrg).")
    p.add_argument("--stream-chunks", type=int, help="Video: stream this many chunks with a rolling EMA-Sink KV "
                   "cache instead of one full-sequence sample (see --help-config for the stream_* keys).")
    p.add_argument("--video-format", default="gif", choices=["gif", "mp4"], help="Container for videos.")
    p.add_argument("--out", help="Output directory (default out/samples).")
    p.add_argument("--help-config", action="store_true", help="List every config key with its help and exit.")
    p.add_argument("overrides", nargs="*", help="Extra config overrides as key=value (e.g. eta=0.5).")
    p.set_defaults(func=cmd_sample)


def _eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="Score a model's samples with a reward, per prompt category; writes a grid.",
                       description="Sample prompts with fixed seeds, score them with a reward and print the mean per "
                                   "category. Without --prompts-file the prompts are the shapes world's (balanced "
                                   "over single/counting/colors/position) and the categories are reported.")
    e.add_argument("--model", default="shapes-sd3", help="Model to evaluate (default shapes-sd3).")
    e.add_argument("--lora", help="A LoRA to load into the model first (a training run's lora/ folder).")
    e.add_argument("--reward", help="Reward name or module:Class (default: the world's verifier, shapes-geneval for "
                                    "image models, shapes-video for video models).")
    e.add_argument("--split", default="test", choices=["train", "test"], help="The world's split (default test).")
    e.add_argument("--n", type=int, default=25, help="Prompts per category (default 25).")
    e.add_argument("--prompts-file", help="Evaluate these prompts (one per line) instead of the shapes prompts.")
    e.add_argument("--steps", type=int, help="Sampling steps (default: the model's own, 20 or a distilled "
                   "student's).")
    e.add_argument("--sampler", help="Sampler (default: the model's own, ode or a distilled student's).")
    e.add_argument("--cfg", type=float, dest="guidance_scale", help="Guidance scale (default: the model's own).")
    e.add_argument("--seed", type=int, default=0, help="Seed for prompts and noise (default 0).")
    e.add_argument("--out", default="out/eval", help="Where to write grid.png and eval.json (default out/eval).")
    e.set_defaults(func=cmd_eval)


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="Run a training recipe from a YAML config; its `task:` key picks the recipe.",
                       description="Run a training recipe: `flowalign train CONFIG [key=value ...]`. The config's "
                                   "top-level `task:` key names the recipe (reward-model: distil a pixel reward into "
                                   "a noise-aware latent reward, configs/reward/); overrides are dotted keys with "
                                   "YAML values.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  flowalign train configs/reward/shapes-clip-latent.yaml\n"
                              "  flowalign train configs/reward/shapes-clip-latent.yaml arch=backbone train_steps=500\n"
                              "  flowalign train --help-config reward-model")
    t.add_argument("config", nargs="?", help="YAML config with a top-level `task:` key.")
    t.add_argument("overrides", nargs="*", help="Config overrides as key=value (e.g. train_steps=500).")
    t.add_argument("--help-config", metavar="TASK", help="List every config key of TASK (e.g. reward-model) and exit.")
    t.set_defaults(func=cmd_train)


def _zoo_parser(sub) -> None:
    z = sub.add_parser("zoo", help="The bundled worlds: rebuild them from fixed seeds, or show where they are.",
                       description="`flowalign zoo build` retrains the bundled shapes world (shapes-clip, then the "
                                   "VAE and shapes-sd3) and the video world (shapes-wan) from fixed seeds; "
                                   "`flowalign zoo path NAME` prints a folder.")
    zs = z.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", required=True)
    b = zs.add_parser("build", help="Rebuild bundled artefacts (about 56 minutes on 2 CPU cores, plus shapes-wan).",
                      description="Rebuild the bundled worlds from fixed seeds, with progress bars. Without --only: "
                                  "toy2d, shapes-clip and shapes-sd3; shapes-wan is built with --only shapes-wan.")
    b.add_argument("--only", choices=["shapes-clip", "shapes-sd3", "shapes-wan", "toy2d"],
                   help="Build one artefact only (shapes-sd3 reuses the built shapes-clip).")
    b.add_argument("--out", help="Write into this folder instead of the package's zoo/weights.")
    b.add_argument("--vae-from", metavar="DIR", help="shapes-wan only: skip the VAE stage and train the transformer "
                   "on the VAE of this shapes-wan pipeline folder (e.g. the bundled one: `flowalign zoo path "
                   "shapes-wan`).")
    b.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="settings",
                   help="shapes-wan only: build settings (flowalign/zoo/build_shapes_wan.py WanBuildConfig), e.g. "
                   "wan_patch=[1,2,2] wan_steps=6000.")
    b.set_defaults(func=cmd_zoo_build)
    pth = zs.add_parser("path", help="Print the folder of a bundled artefact.",
                        description="Print the folder of a bundled artefact (shapes-sd3, shapes-clip or shapes-wan).")
    pth.add_argument("name", help="shapes-sd3, shapes-clip or shapes-wan")
    pth.set_defaults(func=cmd_zoo_path)


def _label_parser(sub) -> None:
    lb = sub.add_parser(
        "label", help="Human preference labels for D3PO: prepare image sets, then label them in a local web page.",
        description="`flowalign label FOLDER --prepare ...` samples N images per prompt from one shared initial noise "
                    "and saves them with their trajectories; `flowalign label FOLDER` serves a page on 127.0.0.1 that "
                    "shows each prompt's images and appends your choices to FOLDER/labels.jsonl (restart it to "
                    "resume at the first unlabelled prompt). Train with `flowalign train configs/d3po/shapes.yaml "
                    "labels=FOLDER`. The folder and labels formats are documented in flowalign/labeling.py.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  flowalign label runs/pairs --prepare --model shapes-sd3 --prompts shapes-train "
               "--num-prompts 40\n  flowalign label runs/pairs --port 8765\n"
               "  flowalign train configs/d3po/shapes.yaml labels=runs/pairs")
    lb.add_argument("folder", help="The labelling folder (made by --prepare).")
    lb.add_argument("--port", type=int, default=8765, help="Port of the page on 127.0.0.1 (default 8765; 0: any free).")
    lb.add_argument("--labels", help="Labels file (default FOLDER/labels.jsonl).")
    lb.add_argument("--prepare", action="store_true", help="Sample the image sets into FOLDER instead of serving.")
    lb.add_argument("--model", default="shapes-sd3", help="--prepare: the model you will train (default shapes-sd3).")
    lb.add_argument("--prompts", default="shapes-train", help="--prepare: shapes-train, shapes-test, a .txt or .jsonl "
                    "file (default shapes-train).")
    lb.add_argument("--num-prompts", type=int, default=32, help="--prepare: the first this many prompts (default 32).")
    lb.add_argument("--n", type=int, default=2, help="--prepare: images per prompt (default 2).")
    lb.add_argument("--steps", type=int, default=10, help="--prepare: sampling steps (default 10).")
    lb.add_argument("--sampler", default="flow-sde", help="--prepare: flow-sde, dance-sde or cps (default flow-sde).")
    lb.add_argument("--eta", type=float, help="--prepare: SDE noise level (default: the sampler's own).")
    lb.add_argument("--cfg", type=float, dest="guidance_scale", help="--prepare: guidance scale (default: the "
                    "model's own).")
    lb.add_argument("--height", type=int, help="--prepare: height in pixels (default: the model's native size).")
    lb.add_argument("--width", type=int, help="--prepare: width in pixels (default: the model's native size).")
    lb.add_argument("--seed", type=int, default=0, help="--prepare: seed (default 0).")
    lb.add_argument("--device", help="--prepare: cuda, cpu ... (default: cuda if available).")
    lb.set_defaults(func=cmd_label)


def build_parser() -> argparse.ArgumentParser:
    from flowalign import __version__

    parser = argparse.ArgumentParser(
        prog="flowalign", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Align diffusion/flow generators (SD3, FLUX, Wan) with rewards. "
                    "Run `flowalign COMMAND --help` for each command's options.")
    parser.add_argument("--version", action="version", version=f"flowalign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _sample_parser(sub)
    d = sub.add_parser("demo", help="The main job on the bundled default: sample, verify and write pictures.",
                       description="Run the bundled demo: sample shapes-sd3 on held-out prompts with every sampler, "
                                   "score with the exact verifier and the CLIP proxy, check log-probs, and write "
                                   "grids and a summary to --out.")
    d.add_argument("--out", default="runs/demo", help="Output directory (default runs/demo).")
    d.add_argument("--steps", type=int, default=20, help="Sampling steps (default 20).")
    d.add_argument("--model", default="shapes-sd3", help="Model (default shapes-sd3).")
    d.add_argument("--per-category", type=int, default=8, help="Prompts per category (default 8).")
    d.set_defaults(func=cmd_demo)
    _train_parser(sub)
    _eval_parser(sub)
    _zoo_parser(sub)
    _label_parser(sub)
    m = sub.add_parser("models", help="List the bundled models and supported families.",
                       description="List bundled model names and the diffusers pipelines flowalign wraps.")
    m.set_defaults(func=cmd_models)
    return parser


def _sample_config(args):
    from flowalign.config import SampleConfig, load_config

    keys = ["model", "prompts", "prompts_file", "num_steps", "sampler", "eta", "guidance_scale", "height", "width",
            "num_frames", "num_images_per_prompt", "seed", "device", "dtype", "out", "stream_chunks"]
    flags = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.guide:
        flags["guide"] = dict(_parse_guide(g) for g in args.guide)
    for k in ("guide_scale", "guide_mode"):
        if getattr(args, k) is not None:
            flags[k] = getattr(args, k)
    cfg = load_config(SampleConfig, args.config, list(args.overrides))
    return load_config(SampleConfig, {**_as_dict(cfg), **flags})


def _parse_guide(text: str) -> tuple[str, float]:
    name, _, weight = text.partition("=")
    try:
        return name, float(weight) if weight else 1.0
    except ValueError:
        raise ValueError(f"--guide expects REWARD or REWARD=WEIGHT (e.g. shapes-clip=1.0), got {text!r}.") from None


def _as_dict(cfg) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


def _read_prompts(cfg) -> list[str]:
    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.exists():
            raise FileNotFoundError(f"prompts file not found: {path}")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("No prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE.")
    return prompts


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_sample(args) -> int:
    if args.help_config:
        from flowalign.config import SampleConfig, describe

        print(describe(SampleConfig))
        return 0
    import torch

    import flowalign as fa
    from flowalign.io import save_samples

    cfg = _sample_config(args)
    prompts = _read_prompts(cfg)
    model = fa.load_model(cfg.model, device=_device(cfg.device), dtype=cfg.dtype)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    guide = None
    if cfg.guide:
        guide = fa.guidance.RewardGuidance(dict(cfg.guide), scale=cfg.guide_scale, mode=cfg.guide_mode,
                                           normalize=cfg.guide_normalize)
    if cfg.stream_chunks:
        return _stream(cfg, model, prompts, gen, args.video_format)
    t0 = time.perf_counter()
    traj = fa.sample(model, prompts, num_steps=cfg.num_steps, sampler=cfg.sampler, eta=cfg.eta,
                     guidance_scale=cfg.guidance_scale, height=cfg.height, width=cfg.width,
                     num_frames=cfg.num_frames, num_images_per_prompt=cfg.num_images_per_prompt, generator=gen,
                     guidance=guide, progress=True)
    seconds = time.perf_counter() - t0
    if traj.images.ndim == 2:  # toy2d: points, not pictures
        paths = _save_points(traj, cfg.out)
    else:
        paths = save_samples(traj.images, cfg.out, video_format=args.video_format)
    record = {"model": cfg.model, "family": model.family, "prompts": traj.prompts, "seed": cfg.seed,
              "dtype": cfg.dtype, "device": str(model.device), **traj.settings(), "seconds": round(seconds, 3),
              "guide": dict(cfg.guide), "guide_scale": cfg.guide_scale, "guide_mode": cfg.guide_mode,
              "files": [Path(p).name for p in paths]}
    if traj.log_probs is not None:
        record["log_probs"] = traj.log_probs.tolist()
    Path(cfg.out, "settings.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {len(paths)} sample(s), grid.png and settings.json to {cfg.out} ({seconds:.1f}s)")
    return 0


def _stream(cfg, model, prompts: list[str], gen, video_format: str) -> int:
    """`flowalign sample --stream-chunks N`: chunked causal generation with a rolling EMA-Sink KV cache."""
    from flowalign.io import save_samples
    from flowalign.sampling.streaming import stream

    if not getattr(model, "is_video", False):
        raise ValueError(f"--stream-chunks needs a video model (Wan); {cfg.model!r} is a {model.family} model.")
    if cfg.guide or cfg.sampler not in (None, "ode"):
        raise ValueError("Streaming integrates each chunk with the Euler ODE and takes no reward guidance; drop "
                         "--sampler / --guide, or sample without --stream-chunks.")
    prompts = [p for p in prompts for _ in range(cfg.num_images_per_prompt)]
    res = stream(model, prompts, num_chunks=cfg.stream_chunks, chunk_frames=cfg.stream_chunk_frames,
                 num_steps=cfg.num_steps, window=cfg.stream_window, sinks=cfg.stream_sinks,
                 sink_ema=cfg.stream_sink_ema, guidance_scale=cfg.guidance_scale, height=cfg.height,
                 width=cfg.width, generator=gen, progress=True)
    paths = save_samples(res.images, cfg.out, video_format=video_format)
    seconds = sum(res.chunk_seconds) + res.decode_seconds
    record = {"model": cfg.model, "family": model.family, "prompts": prompts, "seed": cfg.seed, "streaming": {
        "chunks": cfg.stream_chunks, "chunk_frames": cfg.stream_chunk_frames, "window": cfg.stream_window,
        "sinks": cfg.stream_sinks, "sink_ema": cfg.stream_sink_ema, "frames": res.images.shape[1],
        "fps": res.images.shape[0] * res.images.shape[1] / seconds}, "seconds": round(seconds, 3),
        "files": [Path(p).name for p in paths]}
    Path(cfg.out, "settings.json").write_text(json.dumps(record, indent=2))
    print(f"streamed {len(paths)} video(s) of {res.images.shape[1]} frames to {cfg.out} ({seconds:.1f}s)")
    return 0


def _save_points(traj, out: str) -> list[str]:
    from flowalign.zoo.toy2d import plot

    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, "points.json").write_text(json.dumps({"prompts": traj.prompts, "points": traj.images.tolist()}))
    plot(traj.images, path=str(Path(out, "grid.png")))
    return [str(Path(out, "points.json"))]


def cmd_demo(args) -> int:
    from flowalign.demo import run_demo

    run_demo(args.out, num_steps=args.steps, model_name=args.model, per_category=args.per_category)
    return 0


def cmd_eval(args) -> int:
    import flowalign as fa
    from flowalign.evaluation import evaluate, format_table, shapes_prompts, shapes_video_prompts, write_report

    model = fa.load_model(args.model, device=_device(None))
    if args.lora:
        model.load_lora(args.lora)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.exists():
            raise FileNotFoundError(f"prompts file not found: {path}")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        categories = None
    else:  # the embedded world of the model's kind: moving shapes for video models, shapes for image models
        world = shapes_video_prompts if getattr(model, "is_video", False) else shapes_prompts
        prompts, categories = world(args.split, args.n, args.seed)
    args.reward = args.reward or ("shapes-video" if getattr(model, "is_video", False) else "shapes-geneval")
    reward = fa.rewards.load(args.reward)
    result = evaluate(model, reward, prompts, categories, num_steps=args.steps, sampler=args.sampler,
                      guidance_scale=args.guidance_scale, seed=args.seed, return_images=True)
    out = write_report(result, prompts, args.out, title=f"{args.model} / {args.reward} / {args.split}")
    steps, sampler = args.steps or model.default_num_steps, args.sampler or model.default_sampler
    print(f"{args.model}, reward {args.reward}, {len(prompts)} prompts ({args.split}), {steps} {sampler} steps:")
    print(format_table(result))
    grids = " and ".join(str(out / g) for g in ("grid.gif", "grid.png") if (out / g).exists())
    print(f"wrote {grids} and {out / 'eval.json'}")
    return 0


def _task_of(config: str, overrides: list[str]) -> str:
    """The recipe a training config asks for: its top-level `task:` key (a `task=...` override wins)."""
    import yaml

    from flowalign.config import ConfigError
    from flowalign.trainers import TASKS

    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"Config file not found: {config!r} (resolved to {path.resolve()}).")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"Could not parse config file {config!r}: {e}") from e
    task = data.get("task") if isinstance(data, dict) else None
    for o in overrides:
        key, _, value = o.partition("=")
        if key.strip() == "task":
            task = value.strip()
    if task not in TASKS:
        raise ConfigError(f"{config}: the top-level key `task` must name a recipe, one of {', '.join(TASKS)}; got "
                          f"{task!r}. Add e.g. `task: reward-model` to the file.")
    return task


def cmd_train(args) -> int:
    import importlib

    from flowalign.config import describe
    from flowalign.trainers import TASKS

    if args.help_config:
        if args.help_config not in TASKS:
            raise ValueError(f"Unknown task {args.help_config!r}; choose one of {', '.join(TASKS)}.")
        print(describe(TASKS[args.help_config][0]))
        return 0
    if not args.config:
        raise ValueError("flowalign train needs a config: flowalign train CONFIG.yaml [key=value ...], e.g. "
                         "configs/reward/shapes-clip-latent.yaml.")
    task = _task_of(args.config, list(args.overrides))
    module, fn = TASKS[task][1].split(":")
    getattr(importlib.import_module(module), fn)(args.config, list(args.overrides))
    return 0


def cmd_zoo_build(args) -> int:
    kwargs = {"out_root": Path(args.out)} if args.out else {}
    if args.only == "shapes-wan":
        from flowalign.config import load_config
        from flowalign.zoo.build_shapes_wan import WanBuildConfig
        from flowalign.zoo.build_shapes_wan import build as build_wan

        vae_from = Path(args.vae_from) if args.vae_from else None
        build_wan(load_config(WanBuildConfig, None, args.settings), vae_from=vae_from, **kwargs)
        return 0
    if args.vae_from or args.settings:
        raise ValueError("--vae-from and --set apply to `--only shapes-wan` alone.")
    from flowalign.zoo.build_shapes import build

    build(only=args.only, **kwargs)
    return 0


def cmd_zoo_path(args) -> int:
    from flowalign import zoo

    print(zoo.path(args.name))
    return 0


def cmd_label(args) -> int:
    from flowalign import labeling

    if args.prepare:
        folder = labeling.prepare(args.folder, model=args.model, prompts=args.prompts, num_prompts=args.num_prompts,
                                  n=args.n, num_steps=args.steps, sampler=args.sampler, eta=args.eta,
                                  guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                                  seed=args.seed, device=_device(args.device))
        print(f"prepared {folder}; label it with `flowalign label {folder}`")
        return 0
    try:
        labeling.serve(args.folder, port=args.port, labels=args.labels)
    except OSError as e:
        if e.errno in (98, 48, 10048):  # address in use (Linux, macOS, Windows)
            raise ValueError(f"port {args.port} on 127.0.0.1 is in use; pick another with --port N (0: any free).") \
                from None
        raise
    return 0


def cmd_models(args) -> int:
    from flowalign.models import FAMILIES, bundled_names

    print("bundled:", ", ".join(bundled_names()))
    print("families:", ", ".join(f"{k} -> {v.split(':')[1]}" for k, v in FAMILIES.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, ImportError) as e:
        print(f"flowalign {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
