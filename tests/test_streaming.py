"""Streaming video generation: the EMA-Sink cache maths, the block-causal equivalence, bounded memory, and the
attention processors' lifetime."""

import contextlib

import pytest
import torch
from conftest import gen

import flowalign as fa
from flowalign.functional.ema_sink import RollingKVCache, ema_fold
from flowalign.sampling.streaming import stream

PROMPTS = ["a red circle", "two blue squares"]
SIZE = dict(height=32, width=32)  # 4x4 latents, 2x2 = 4 tokens per frame on the tiny Wan


@pytest.fixture(scope="module")
def wan():
    return fa.load_model("tiny-wan")


@pytest.fixture(scope="module")
def wan_pt2():
    """A tiny Wan whose transformer patches 2 latent frames at a time (temporal patch size 2)."""
    from diffusers import WanPipeline, WanTransformer3DModel

    from flowalign.models import tiny

    pipe = tiny.build("tiny-wan")
    torch.manual_seed(1)
    tr = WanTransformer3DModel(patch_size=(2, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                               out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                               cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    return fa.load_model(WanPipeline(**{**pipe.components, "transformer": tr}))


def frames(n, b=2, t=3, h=2, d=4, seed=0, dtype=torch.float32):
    """``(B, n, T, H, D)`` frames whose values differ per frame."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, t, h, d, generator=g).to(dtype)


# ------------------------------------------------------------------------------------------- EMA-Sink maths
def test_rolling_cache_keeps_latest_window_and_ema_sink_of_evicted_frames():
    S, W, alpha = 2, 3, 0.9
    k, v = frames(10, seed=0), frames(10, seed=1)
    cache = RollingKVCache(window=W, sinks=S, alpha=alpha)
    for i in range(0, 10, 2):  # five chunks of two frames
        cache.append(k[:, i:i + 2], v[:, i:i + 2])
        assert cache.num_frames <= S + W
    assert (cache.sink_frames, cache.window_frames, cache.num_evicted) == (S, W, 10 - S - W)
    assert torch.equal(cache.window_k, k[:, 7:]) and torch.equal(cache.window_v, v[:, 7:])
    # frames 2..6 were evicted, oldest first, frame 2 + n into slot n mod 2; closed form in float64
    for x, sink in ((k, cache.sink_k), (v, cache.sink_v)):
        x = x.double()
        a = alpha
        slot0 = a**3 * x[:, 0] + a**2 * (1 - a) * x[:, 2] + a * (1 - a) * x[:, 4] + (1 - a) * x[:, 6]
        slot1 = a**2 * x[:, 1] + a * (1 - a) * x[:, 3] + (1 - a) * x[:, 5]
        torch.testing.assert_close(sink.double(), torch.stack([slot0, slot1], 1), atol=1e-6, rtol=0)
    ck, cv = cache.keys_values()
    assert ck.shape == (2, (S + W) * 3, 2, 4) and ck.dtype == torch.float32
    assert torch.equal(ck, torch.cat([cache.sink_k, cache.window_k], 1).flatten(1, 2))
    assert torch.equal(cv[:, -3 * 3:], v[:, 7:].flatten(1, 2))  # the window ends with the newest frame


def test_eviction_order_is_oldest_first_and_chunking_does_not_matter():
    """EMA is not commutative: one frame at a time, whole chunks and one big append must give the same sink, and
    that sink must be the fold of the evicted frames in time order (not reversed)."""
    k = frames(9, seed=2)
    sinks = []
    for step in (1, 3, 9):
        cache = RollingKVCache(window=2, sinks=1, alpha=0.5)
        for i in range(0, 9, step):
            cache.append(k[:, i:i + step], k[:, i:i + step])
        sinks.append(cache.sink_k)
    torch.testing.assert_close(sinks[0], sinks[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(sinks[0], sinks[2], atol=1e-6, rtol=0)
    forward = ema_fold(k[:, :1], k[:, 1:7], 0.5, 0)
    backward = ema_fold(k[:, :1], k[:, 1:7].flip(1), 0.5, 0)
    torch.testing.assert_close(sinks[0], forward, atol=1e-6, rtol=0)
    assert not torch.allclose(sinks[0], backward, atol=1e-3)


def test_alpha_one_keeps_the_first_frames_and_no_sink_is_a_sliding_window():
    k = frames(7, seed=3)
    frozen = RollingKVCache(window=2, sinks=2, alpha=1.0)
    sliding = RollingKVCache(window=2, sinks=0)
    for i in range(7):
        frozen.append(k[:, i:i + 1], k[:, i:i + 1])
        sliding.append(k[:, i:i + 1], k[:, i:i + 1])
    assert torch.equal(frozen.sink_k, k[:, :2]) and torch.equal(frozen.window_k, k[:, 5:])
    assert sliding.sink_k is None and torch.equal(sliding.window_k, k[:, 5:]) and sliding.num_frames == 2
    unbounded = RollingKVCache(window=None, sinks=1)
    unbounded.append(k, k)
    assert unbounded.num_frames == 7 and unbounded.num_evicted == 0


def test_cache_state_is_fp32_and_exact_for_low_precision_input():
    k = frames(3, dtype=torch.bfloat16)
    cache = RollingKVCache(window=2, sinks=1, alpha=0.999)
    cache.append(k, k)
    assert cache.sink_k.dtype == torch.float32 and torch.equal(cache.sink_k, k[:, :1].float())


def test_cache_rejects_bad_input():
    with pytest.raises(ValueError, match="window"):
        RollingKVCache(window=0)
    with pytest.raises(ValueError, match="sinks"):
        RollingKVCache(window=2, sinks=-1)
    with pytest.raises(ValueError, match="alpha"):
        RollingKVCache(window=2, alpha=1.5)
    cache = RollingKVCache(window=2, sinks=1)
    with pytest.raises(ValueError, match=r"\(B, F, T, H, D\)"):
        cache.append(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    cache.append(frames(1), frames(1))
    with pytest.raises(ValueError, match="does not match"):
        cache.append(frames(1, t=5), frames(1, t=5))


# ------------------------------------------------------------------------------------------- block-causal anchor
class _Masked:
    """Wan's own attention with an explicit boolean mask on the self-attention."""

    def __init__(self, inner, mask):
        self.inner, self.mask = inner, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


@contextlib.contextmanager
def masked_self_attention(transformer, mask):
    saved = [b.attn1.processor for b in transformer.blocks]
    try:
        for b, p in zip(transformer.blocks, saved):
            b.attn1.set_processor(_Masked(p, mask))
        yield
    finally:
        for b, p in zip(transformer.blocks, saved):
            b.attn1.set_processor(p)


def block_causal_rollout(model, cond, noise, chunk, sigmas, gs):
    """The reference: each chunk is integrated with full-sequence forwards over [clean earlier chunks, this chunk]
    under a block-causal mask (chunk i attends to chunks <= i), clean chunks at timestep 0."""
    tr = model.transformer
    p_t, p_h, p_w = tr.config.patch_size
    b, _, nf, h, w = noise.shape
    tokens = (h // p_h) * (w // p_w)
    done = []
    for i in range(nf // chunk):
        x = noise[:, :, i * chunk:(i + 1) * chunk]
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            seq = torch.cat(done + [x], dim=2)
            patch_frames = seq.shape[2] // p_t
            chunk_of_token = (torch.arange(patch_frames) // (chunk // p_t)).repeat_interleave(tokens)
            mask = chunk_of_token[:, None] >= chunk_of_token[None, :]
            clean = (patch_frames - chunk // p_t) * tokens
            t = torch.cat([torch.zeros(clean), torch.full((chunk // p_t * tokens,), float(s) * 1000)]).expand(b, -1)
            with torch.no_grad(), masked_self_attention(tr, mask):
                out = tr(hidden_states=seq, timestep=t, return_dict=False, **cond.cond)[0]
                if gs > 1:
                    out_u = tr(hidden_states=seq, timestep=t, return_dict=False, **cond.uncond)[0]
                    out = out_u + gs * (out - out_u)
            x = x + (s_next - s) * out[:, :, -chunk:].float()
        done.append(x)
    return torch.cat(done, dim=2)


@pytest.mark.parametrize("gs,patched", [(1.0, False), (3.0, False), (1.0, True)])
def test_unbounded_stream_equals_block_causal_full_sequence(wan, wan_pt2, gs, patched):
    model, chunk = (wan_pt2, 2) if patched else (wan, 2)
    cond = model.encode(PROMPTS, guidance_scale=gs)
    noise = model.noise(2, num_frames=(3 * chunk - 1) * 4 + 1, generator=gen(0), **SIZE)
    res = stream(model, PROMPTS, num_chunks=3, chunk_frames=chunk, num_steps=3, window=None, sinks=2 if patched else 1,
                 guidance_scale=gs, noise=noise, cond=cond, decode=False)
    ref = block_causal_rollout(model, cond, noise, chunk, model.sigmas(3), gs)
    assert res.latents.shape == noise.shape
    torch.testing.assert_close(res.latents, ref, atol=1e-5, rtol=1e-5)
    assert (res.latents[:, :, chunk:] - noise[:, :, chunk:]).abs().max() > 0.1  # later chunks did move


def test_first_chunk_equals_fa_sample_of_that_chunk(wan):
    noise = wan.noise(2, num_frames=9, generator=gen(1), **SIZE)  # 3 latent frames
    res = stream(wan, PROMPTS, num_chunks=1, chunk_frames=3, num_steps=4, guidance_scale=4.0, noise=noise,
                 decode=False)
    traj = fa.sample(wan, PROMPTS, num_steps=4, sampler="ode", guidance_scale=4.0, num_frames=9, latents=noise,
                     decode=False, **SIZE)
    torch.testing.assert_close(res.latents, traj.x0, atol=1e-5, rtol=1e-5)


def test_window_and_sink_ema_change_the_stream_only_once_frames_are_evicted(wan):
    noise = wan.noise(1, num_frames=(6 - 1) * 4 + 1, generator=gen(2), **SIZE)  # 6 latent frames, 3 chunks of 2

    def run(window, sinks=1, alpha=0.9):
        return stream(wan, PROMPTS[:1], num_chunks=3, chunk_frames=2, num_steps=2, window=window, sinks=sinks,
                      sink_ema=alpha, guidance_scale=1.0, noise=noise, decode=False).latents

    unbounded = run(None)
    torch.testing.assert_close(run(3), unbounded, atol=1e-6, rtol=0)  # S + W = 4 frames: nothing evicted
    small, frozen = run(1), run(1, alpha=1.0)
    torch.testing.assert_close(small[:, :, :2], unbounded[:, :, :2], atol=1e-6, rtol=0)  # chunk 0 has no context
    assert (small[:, :, 4:] - unbounded[:, :, 4:]).abs().max() > 1e-4
    assert (small[:, :, 4:] - frozen[:, :, 4:]).abs().max() > 1e-5  # the EMA moved the sink


# ------------------------------------------------------------------------------------------- memory and plumbing
@pytest.mark.parametrize("gs", [1.0, 2.0])
def test_long_stream_holds_a_constant_cache(wan, gs):
    S, W, n = 1, 2, 8
    res = stream(wan, PROMPTS[:1], num_chunks=n, chunk_frames=1, num_steps=1, window=W, sinks=S, guidance_scale=gs,
                 generator=gen(3), decode=True, **SIZE)
    assert res.context_frames == [0, 1, 2, 3, 3, 3, 3, 3]
    tr = wan.transformer
    per_frame = 4 * tr.config.num_attention_heads * tr.config.attention_head_dim  # 4 tokens, fp32 bytes below
    branches = 2 if gs > 1 else 1
    full = branches * len(tr.blocks) * 2 * (S + W) * per_frame * 4
    assert res.cache_bytes[3:] == [full] * (n - 3) and res.cache_bytes[1] < full
    assert res.latents.shape == (1, 16, n, 4, 4) and res.images.shape == (1, (n - 1) * 4 + 1, 3, 32, 32)
    assert len(res.chunk_seconds) == n and res.frames_per_second > 0


def test_processors_are_restored_after_the_call_and_after_an_error(wan):
    tr = wan.transformer
    before = [b.attn1.processor for b in tr.blocks]
    x = wan.noise(1, generator=gen(4), **SIZE)
    cond = wan.encode(PROMPTS[:1], guidance_scale=1.0)
    v_before = wan.velocity(x, 0.5, cond, 1.0)
    seen = []
    stream(wan, PROMPTS[:1], num_chunks=2, chunk_frames=1, num_steps=1, guidance_scale=1.0, generator=gen(0),
           on_chunk=lambda i, c: seen.append(type(tr.blocks[0].attn1.processor).__name__), decode=False, **SIZE)
    assert seen == ["CachedSelfAttention"] * 2
    assert all(b.attn1.processor is p for b, p in zip(tr.blocks, before))

    def boom(i, chunk):
        raise RuntimeError("consumer failed")

    with pytest.raises(RuntimeError, match="consumer failed"):
        stream(wan, PROMPTS[:1], num_chunks=2, chunk_frames=1, num_steps=1, guidance_scale=1.0, on_chunk=boom,
               decode=False, **SIZE)
    assert all(b.attn1.processor is p for b, p in zip(tr.blocks, before))
    assert torch.equal(wan.velocity(x, 0.5, cond, 1.0), v_before)


def test_bad_input_gives_clear_errors(wan, wan_pt2, tiny_sd3):
    ok = dict(num_chunks=2, chunk_frames=1, num_steps=1, guidance_scale=1.0, decode=False, **SIZE)
    with pytest.raises(ValueError, match="Wan model"):
        stream(tiny_sd3, PROMPTS, **ok)
    for key, value, match in [("window", 0, "window"), ("sinks", -1, "sinks"), ("sink_ema", 1.5, "sink_ema"),
                              ("chunk_frames", 0, "chunk_frames"), ("num_chunks", 0, "num_chunks"),
                              ("num_steps", 0, "num_steps"), ("window", 2.5, "window")]:
        with pytest.raises(ValueError, match=match):
            stream(wan, PROMPTS, **{**ok, key: value})
    with pytest.raises(ValueError, match="temporal patch size 2"):
        stream(wan_pt2, PROMPTS, **{**ok, "chunk_frames": 3})
    with pytest.raises(ValueError, match="RoPE"):  # the tiny Wan's RoPE table covers 32 frames
        stream(wan, PROMPTS, **{**ok, "num_chunks": 12, "chunk_frames": 3, "window": None})
    with pytest.raises(ValueError, match="noise has shape"):
        stream(wan, PROMPTS, **{**ok, "noise": torch.zeros(2, 16, 3, 4, 4)})
    with pytest.raises(ValueError, match="encoded without CFG"):
        stream(wan, PROMPTS, **{**ok, "guidance_scale": 5.0, "cond": wan.encode(PROMPTS, guidance_scale=1.0)})
