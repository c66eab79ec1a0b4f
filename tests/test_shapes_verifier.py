"""The shapes verifier (``shapes-geneval``): caption parsing, exactness on ground-truth renders (both splits, 32 and
64 px, any background), rejection of noise, blank canvases and wrong captions, and clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import flowalign.rewards as fr
from flowalign.rewards.shapes import (
    Detection,
    ShapesPartialVerifier,
    ShapesVerifier,
    analyse,
    parse_caption,
    partial_score,
    relation_holds,
    verify,
)
from flowalign.zoo import shapes_data as sd
from flowalign.zoo.shapes_data import COLORS, Obj, Spec


def renders(n: int, split: str, seed: int, size: int):
    """(image (H, W, 3) uint8, spec, layout) as ``dataset(n, split, seed, size)`` draws them; the layout is
    replayed from a copy of the generator state (render draws the background, then the layout)."""
    specs, rng = sd.sample_specs(n, split, seed), np.random.default_rng(seed + 1)
    out = []
    for spec in specs:
        replay = np.random.default_rng()
        replay.bit_generator.state = rng.bit_generator.state
        image = sd.render(spec, size, rng)
        sd.background(replay)
        out.append((image, spec, sd._layout(spec, size, replay)))
    return out


def separated(layout, gap: float = 1.0) -> bool:
    """Whether the drawn shapes are at least ``gap`` px apart (circumscribed circles, so conservative).

    The renderer spaces shapes by their inscribed radius plus 2.5 px, so at 64 px and above square corners can
    touch or overlap (two same-colour squares merge into one blob); such layouts are not valid ground truth.
    """
    def outer(shape):
        v = sd._polygon(shape, 0.0, 0.0, 1.0)
        return 1.0 if v is None else max(math.hypot(x, y) for x, y in v)

    return all(math.hypot(x1 - x2, y1 - y2) > outer(o1.shape) * r1 + outer(o2.shape) * r2 + gap
               for i, (o1, x1, y1, r1) in enumerate(layout) for o2, x2, y2, r2 in layout[i + 1:])


def accuracy(pairs) -> dict[str, float]:
    acc: dict[str, list[bool]] = {}
    for image, spec in pairs:
        acc.setdefault(spec.category, []).append(verify(image, spec))
    return {c: float(np.mean(v)) for c, v in acc.items()}


def wrong_specs(spec: Spec) -> list[Spec]:
    """Captions that the image of ``spec`` does not show: another colour, shape or count, a flipped relation,
    and (two objects) the colours swapped between them."""
    names = list(COLORS)
    a = spec.objects[0]
    recolor = Obj(names[(names.index(a.color) + 1) % len(names)], a.shape)
    reshape = Obj(a.color, sd.SHAPES[(sd.SHAPES.index(a.shape) + 1) % 3])
    out = [Spec(spec.category, (o, *spec.objects[1:]), spec.count, spec.relation) for o in (recolor, reshape)]
    if spec.category == "counting":
        out.append(Spec("counting", spec.objects, count=spec.count % 4 + 1))
    if len(spec.objects) == 2:
        b = spec.objects[1]
        if a.color != b.color:
            out.append(Spec(spec.category, (Obj(b.color, a.shape), Obj(a.color, b.shape)), relation=spec.relation))
    if spec.category == "position":
        flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        out.append(Spec("position", spec.objects, relation=flip[spec.relation]))
    return [s for s in out if s.objects[0] != s.objects[-1] or len(s.objects) == 1]


@pytest.fixture(scope="module")
def gt32():
    return {split: sd.dataset(400, split, seed=11, size=32) for split in sd.SPLITS}


# ------------------------------------------------------------------------------------------------ parsing
def test_parse_inverts_every_caption():
    specs = sd.all_specs()
    assert all(parse_caption(s.caption()) == s for s in specs)
    assert parse_caption("  A Red  Circle. ") == Spec("single", (Obj("red", "circle"),))
    assert parse_caption("one blue square") == Spec("counting", (Obj("blue", "square"),), count=1)


@pytest.mark.parametrize("caption", ["a pink circle", "five red circles", "two red circle", "three red circle",
                                     "a red circle left of a blue square", "a red hexagon", "", "red circle",
                                     "a red circle to the left of a red circle"])
def test_parse_errors_name_the_caption_and_show_a_valid_one(caption):
    with pytest.raises(ValueError, match="a red circle") as e:
        parse_caption(caption)
    assert repr(caption) in str(e.value)


def test_registered_and_not_differentiable():
    reward = fr.load("shapes-geneval")
    assert isinstance(reward, ShapesVerifier) and "shapes-geneval" in fr.available()
    assert reward.name == "shapes-geneval" and not reward.differentiable


# ------------------------------------------------------------------------------------------------ ground truth
@pytest.mark.parametrize("split", sd.SPLITS)
def test_ground_truth_renders_verify_at_32px(gt32, split):
    images, captions, _ = gt32[split]
    result = ShapesVerifier().evaluate(images, captions)
    assert set(result) == {"overall", *sd.CATEGORIES}
    assert min(result.values()) >= 0.99, result


def test_ground_truth_renders_verify_at_64_and_128px():
    for size, n in ((64, 120), (128, 16)):
        for split in sd.SPLITS:
            data = [(img, s) for img, s, lay in renders(n, split, seed=5, size=size) if separated(lay)]
            assert len(data) >= 0.7 * n  # the filter is conservative, more so at large sizes
            acc = accuracy(data)
            assert min(acc.values()) >= 0.99, (size, split, acc)


@pytest.mark.parametrize("bg", [(0, 0, 0), (8, 10, 6), (128, 128, 128), (140, 128, 116), (247, 245, 250),
                                (255, 255, 255)])
def test_any_background(monkeypatch, bg):
    monkeypatch.setattr(sd, "background", lambda rng: bg)
    rng = np.random.default_rng(sum(bg))
    specs = sd.eval_prompts("test", per_category=8, seed=1) + sd.eval_prompts("train", per_category=8, seed=1)
    data = [(sd.render(s, 32, rng), s) for s in specs]
    assert all(img[0, 0].tolist() == list(bg) for img, _ in data)
    assert min(accuracy(data).values()) == 1.0


def test_detections_locate_the_rendered_shapes():
    for image, spec, layout in renders(40, "train", seed=2, size=32):
        found = sorted(analyse(image), key=lambda o: (o.x, o.y))
        placed = sorted(layout, key=lambda p: (p[1], p[2]))
        assert [(o.color, o.shape) for o in found] == [(p[0].color, p[0].shape) for p in placed]
        for o, (_, cx, cy, _) in zip(found, placed):
            assert abs(o.x - cx) < 0.3 and abs(o.y - cy) < 0.3, (spec.caption(), o, (cx, cy))
            x0, y0, x1, y1 = o.bbox
            assert x0 <= cx <= x1 and y0 <= cy <= y1 and o.fit_error < 0.1


def test_uint8_array_and_tensor_agree():
    image, spec, _ = renders(1, "test", seed=3, size=32)[0]
    tensor = torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255
    a, b = analyse(image), analyse(tensor)
    assert [(o.color, o.shape, o.bbox) for o in a] == [(o.color, o.shape, o.bbox) for o in b]
    assert np.allclose([(o.x, o.y, o.area) for o in a], [(o.x, o.y, o.area) for o in b])
    assert verify(image, spec.caption()) and verify(tensor, spec)


def test_soft_and_noisy_renders_still_verify(gt32):
    """Decoded images are softer and noisier than renders: a 3x3 binomial blur or N(0, 8/255) noise keeps them."""
    images, _, specs = gt32["test"]
    images, specs = images[:120], specs[:120]
    k = torch.tensor([0.25, 0.5, 0.25])
    kernel = (k[:, None] * k[None]).expand(3, 1, 3, 3)
    blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate"), kernel,
                                         groups=3)
    noisy = (images + 8 / 255 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    for degraded in (blurred, noisy):
        assert np.mean([verify(x, s) for x, s in zip(degraded, specs)]) >= 0.97


def test_relation_rule():
    def at(x, y):
        return Detection("red", "circle", x, y, 10.0, (0, 0, 1, 1), 0.0)

    assert relation_holds(at(5, 16), at(20, 18), "left of", 32)
    assert relation_holds(at(20, 18), at(5, 16), "right of", 32)
    assert not relation_holds(at(5, 16), at(20, 18), "right of", 32)
    assert not relation_holds(at(14, 16), at(16, 16), "left of", 32)  # closer than the margin
    assert relation_holds(at(5, 5), at(20, 25), "above", 32) and not relation_holds(at(5, 5), at(20, 25), "left of", 32)
    assert relation_holds(at(16, 4), at(16, 28), "above", 32) and relation_holds(at(16, 28), at(16, 4), "below", 32)


# ------------------------------------------------------------------------------------------------ rejection
def test_noise_and_blank_canvases_score_zero():
    g = torch.Generator().manual_seed(0)
    specs = sd.sample_specs(150, "train", seed=4)
    noise = torch.rand(150, 3, 32, 32, generator=g)
    blocky = torch.nn.functional.interpolate(torch.rand(60, 3, 8, 8, generator=g), size=32)
    blank = torch.rand(60, 3, 1, 1, generator=g).expand(60, 3, 32, 32)
    for images, rules in ((noise, (True, False)), (blocky, (True,)), (blank, (True, False))):
        found = [analyse(x) for x in images]
        for strict in rules:  # not GenEval's rules on blocky noise: its 4x4 blocks are real squares amid clutter
            passed = [verify(x, s, strict, objects=o) for x, s, o in zip(images, specs, found)]
            assert np.mean(passed) <= 0.02, (strict, np.mean(passed))
    assert ShapesVerifier()(noise[:20], [s.caption() for s in specs[:20]]).sum() == 0


def test_wrong_captions_are_rejected(gt32):
    images, _, specs = gt32["test"]
    found = [analyse(img) for img in images[:200]]
    wrong = [verify(img, w, objects=o) for img, s, o in zip(images, specs, found) for w in wrong_specs(s)]
    assert len(wrong) > 400 and 1 - np.mean(wrong) >= 0.97


def test_strict_and_geneval_rules_on_extra_objects():
    image = sd.render(parse_caption("a red circle and a blue square"), 32, np.random.default_rng(0))
    assert verify(image, "a red circle and a blue square")
    assert not verify(image, "a red circle") and verify(image, "a red circle", strict=False)
    two = sd.render(Spec("counting", (Obj("red", "circle"),), count=2), 32, np.random.default_rng(0))
    assert not verify(two, "one red circle", strict=False) and verify(two, "two red circles", strict=False)


def test_partial_credit_is_one_exactly_where_the_verifier_passes(gt32):
    images, _, specs = gt32["test"]
    found = [analyse(img) for img in images[:120]]
    pairs = [(img, w, o) for img, s, o in zip(images, specs, found) for w in [s, *wrong_specs(s)]]
    strict = np.array([verify(img, w, objects=o) for img, w, o in pairs])
    partial = np.array([partial_score(img, w, objects=o) for img, w, o in pairs])
    assert strict.sum() >= 100 and (~strict).sum() >= 200
    assert ((partial == 1.0) == strict).all() and ((partial >= 0) & (partial <= 1)).all()
    assert 0 < partial[~strict].mean() < 1  # near misses get some credit, not all


def test_partial_credit_counts_missing_and_extra_objects_alike():
    def det(color, shape, x=10.0, y=10.0):
        return Detection(color, shape, x, y, 20.0, (0, 0, 1, 1), 0.0)

    image = np.zeros((32, 32, 3), np.uint8)
    three = "three green triangles"
    assert partial_score(image, three, objects=[det("green", "triangle")] * 2) == pytest.approx(2 / 3)
    assert partial_score(image, three, objects=[det("green", "triangle")] * 3 + [det("red", "circle")]) == 0.75
    assert partial_score(image, three, objects=[]) == 0.0
    assert partial_score(image, "a red circle and a blue square", objects=[det("red", "circle")]) == 0.5
    position = "a red circle to the left of a blue square"
    left, right = det("red", "circle", x=6.0), det("blue", "square", x=24.0)
    assert partial_score(image, position, objects=[left, right]) == 1.0
    assert partial_score(image, position, objects=[det("red", "circle", x=26.0), right]) == 0.5
    assert partial_score(image, position, objects=[left]) == 0.25  # half the objects, no pair to relate


def test_partial_reward_is_registered_and_scores_like_the_function(gt32):
    reward = fr.load("shapes-geneval-partial")
    assert isinstance(reward, ShapesPartialVerifier) and reward.name == "shapes-geneval-partial"
    images, captions, specs = gt32["train"]
    x = images[:8]
    wrong = [wrong_specs(s)[0].caption() for s in specs[:8]]
    want = [partial_score(img.permute(1, 2, 0).numpy(), c) for img, c in zip(x, wrong)]
    assert reward(x, wrong).tolist() == pytest.approx(want)
    assert reward(x, captions[:8]).tolist() == [1.0] * 8


# ------------------------------------------------------------------------------------------------ errors
def test_non_finite_pixels_are_a_clear_error():
    images = torch.rand(3, 3, 32, 32)
    images[1, 0, 4, 4] = float("nan")
    with pytest.raises(ValueError, match=r"indices \[1\].*NaN"):
        ShapesVerifier()(images, "a red circle")
    with pytest.raises(ValueError, match="NaN"):
        analyse(images[1])


def test_bad_caption_fails_in_the_reward():
    with pytest.raises(ValueError, match="not in the shapes grammar"):
        ShapesVerifier()(torch.rand(1, 3, 32, 32), ["a red circle please"])


def test_video_scores_mean_of_frames():
    image, spec, _ = renders(1, "train", seed=6, size=32)[0]
    frame = torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255
    video = torch.stack([frame, torch.rand_like(frame)])[None]  # (1, F=2, 3, H, W)
    assert ShapesVerifier()(video, [spec.caption()]).tolist() == [0.5]


@pytest.mark.parametrize("name", ["shapes-geneval", "shapes-geneval-partial", "shapes-geneval-soft"])
def test_worker_processes_judge_exactly_as_in_process(name):
    """``workers=2`` forks a pool for the batch; every score equals the in-process one, on right and wrong
    captions, and the pool is reused by the next call."""
    data = renders(24, "test", seed=5, size=32)
    images = torch.from_numpy(np.stack([im for im, _, _ in data])).permute(0, 3, 1, 2).float() / 255
    captions = [s.caption() for _, s, _ in data]
    captions = captions[:12] + captions[13:] + captions[12:13]  # half of them describe another image
    expected = fr.load(name)(images, captions)
    pooled = fr.load(name, workers=2)
    assert torch.equal(pooled(images, captions), expected)
    assert pooled._pool is not None
    assert torch.equal(pooled(images.flip(0), captions[::-1]), expected.flip(0))
    with pytest.raises(ValueError, match="workers"):
        fr.load(name, workers=-1)
    with pytest.raises(TypeError, match=f"{name}.*bogus"):
        fr.load(name, bogus=1)
