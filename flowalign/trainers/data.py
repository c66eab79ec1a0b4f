"""Prompt sources for training and evaluation: the shapes world's splits, text files, JSONL files."""

from __future__ import annotations

import json
from pathlib import Path

#: built-in sources: the shapes world's training and held-out captions, and the moving-shapes video world's
SHAPES_SOURCES = ("shapes-train", "shapes-test")
VIDEO_SOURCES = ("shapes-video-train", "shapes-video-test")
SHAPES_DRAWS = 4096


def load_prompts(source: str, limit: int | None = None) -> list[str]:
    """Prompts from ``shapes-train`` / ``shapes-test``, ``shapes-video-train`` / ``shapes-video-test``,
    ``toy2d:<class>[,<class>...]`` (toy2d class names), a ``.txt`` file (one per line) or a ``.jsonl`` file (one
    object per line with a ``"prompt"`` key). Blank lines are skipped; the order is kept.

    A shapes split gives :data:`SHAPES_DRAWS` captions drawn (fixed seed) with the category proportions the base
    model was trained on, so a uniform pick from the list is not dominated by the many position compositions."""
    if source.startswith("toy2d:"):
        from flowalign.zoo.toy2d import CLASS_NAMES

        prompts = [c.strip() for c in source[len("toy2d:"):].split(",") if c.strip()]
        bad = [c for c in prompts if c not in CLASS_NAMES]
        if bad or not prompts:
            raise ValueError(f"Unknown toy2d class(es) {bad or source!r}; choose from {', '.join(CLASS_NAMES)}.")
    elif source in SHAPES_SOURCES:
        from flowalign.zoo import shapes_data

        split = source.split("-", 1)[1]
        prompts = [s.caption() for s in shapes_data.sample_specs(SHAPES_DRAWS, split, seed=0)]
    elif source in VIDEO_SOURCES:
        from flowalign.zoo import shapes_video

        prompts = [s.caption() for s in shapes_video.sample_specs(SHAPES_DRAWS, source.rsplit("-", 1)[1], seed=0)]
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Prompt file {source!r} does not exist. Give a .txt file (one prompt per line), "
                                    f"a .jsonl file ({{\"prompt\": ...}} per line) or one of "
                                    f"{SHAPES_SOURCES + VIDEO_SOURCES}.")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        if path.suffix == ".jsonl":
            prompts = []
            for n, ln in enumerate(lines, 1):
                if not ln:
                    continue
                try:
                    prompts.append(str(json.loads(ln)["prompt"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{source}:{n}: each JSONL line must be an object with a \"prompt\" key; "
                                     f"got {ln[:80]!r}.") from None
        else:
            prompts = [ln for ln in lines if ln]
        if not prompts:
            raise ValueError(f"Prompt file {source!r} holds no prompts.")
    return prompts[:limit] if limit else prompts


def categories_of(prompts: list[str]) -> list[str] | None:
    """The shapes category of each prompt when every prompt is a shapes caption, else None."""
    from flowalign.rewards.shapes import parse_caption

    try:
        return [parse_caption(p).category for p in prompts]
    except Exception:
        return None


def video_categories_of(prompts: list[str]) -> list[str] | None:
    """The moving-shapes category of each prompt when every prompt is a caption of the moving-shapes video world
    (``flowalign.zoo.shapes_video``), else None."""
    from flowalign.zoo.shapes_video import parse_video_caption

    try:
        return [parse_video_caption(p).category for p in prompts]
    except ValueError:
        return None


#: the embedded worlds whose captions :func:`world_of` recognises
WORLDS = ("shapes", "shapes-video")


def world_of(prompts: list[str]) -> tuple[str | None, list[str] | None]:
    """Which embedded world every prompt is a caption of, with each prompt's category: ``("shapes", cats)`` for
    the image world, ``("shapes-video", cats)`` for the moving-shapes video world, ``(None, None)`` otherwise (the
    two grammars share no caption)."""
    if not prompts:
        return None, None
    cats = categories_of(prompts)
    if cats is not None:
        return "shapes", cats
    cats = video_categories_of(prompts)
    return ("shapes-video", cats) if cats is not None else (None, None)
