"""Streaming (chunked causal) video generation with a rolling, EMA-Sink key/value cache (Reward Forcing).

A video of ``num_chunks * chunk_frames`` latent frames is generated chunk by chunk with a Wan transformer:

1. the chunk starts from noise and is integrated from sigma = 1 to 0 by Euler steps of the flow ODE over the
   model's own sigma grid (``model.sigmas``); at every step the transformer sees only this chunk's tokens, and
   each self-attention (``attn1``) attends to the chunk itself (bidirectionally) and to the cached keys/values
   of earlier clean frames;
2. the clean chunk is run once more at sigma = 0 and each layer appends the chunk's keys/values to its
   :class:`~flowalign.functional.ema_sink.RollingKVCache` (as Self-Forcing and Reward Forcing do), which keeps
   ``sinks`` EMA-Sink slots and a rolling window of the latest ``window`` frames (the last chunk skips this
   pass: nothing reads it);
3. the latents are decoded once at the end with ``model.decode``.

With ``window=None`` nothing is evicted and the result equals a full-sequence forward with a block-causal
attention mask (chunk i attends to chunks <= i) and timestep 0 on the clean chunks (tested).

**Temporal positions (RoPE).** Keys are cached *before* the rotary embedding and rotated when attended, at
cache-relative frame positions: the cached frames take positions ``0 .. n-1`` in slot order (sink slots, then the
window oldest first) and the current chunk continues at ``n .. n+c-1``. Until the first eviction these are the
absolute frame indices; once the window rolls, positions stay in ``[0, S + W + c)``, so the length of a stream
is not limited by the RoPE table (``rope_max_seq_len`` frames: 1024 for Wan 2.1, 32 for the tiny pipeline).
Caching un-rotated keys also makes the EMA-Sink average keys without mixing rotary phases of different frames.

**CFG.** ``guidance_scale > 1`` runs a conditional and an unconditional branch, each with its own caches
(written from its own pass over the clean chunk), combined as ``u + s (c - u)`` like ``WanModel.velocity``.
Distilled causal students are CFG-free: pass ``guidance_scale=1`` (one branch, half the cost).

Inference only (no autograd graph is kept); the attention processors are replaced for the duration of the
call and restored afterwards, also on error.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from flowalign.functional import sde
from flowalign.functional.ema_sink import DEFAULT_ALPHA, RollingKVCache
from flowalign.models import Conditioning, load_model


@dataclass
class StreamResult:
    """A streamed batch of videos and how it was made.

    Attributes:
        latents: ``(B, C, f, h, w)`` clean latents, ``f = num_chunks * chunk_frames``.
        images: ``(B, F, 3, H, W)`` decoded pixels in [0, 1], ``F = (f - 1) * temporal_factor + 1``; None if not
            decoded.
        chunk_seconds: wall time of each chunk (its denoising steps and its cache write).
        decode_seconds: wall time of the final decode (0 if not decoded).
        context_frames: per chunk, the cached frames its attention saw (bounded by ``sinks + window``).
        cache_bytes: per chunk, the bytes held by all layer caches (both CFG branches) while it was denoised.
    """

    latents: torch.Tensor
    images: torch.Tensor | None
    prompts: list[str]
    settings: dict
    chunk_seconds: list[float] = field(default_factory=list)
    decode_seconds: float = 0.0
    context_frames: list[int] = field(default_factory=list)
    cache_bytes: list[int] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        """Output video frames (pixel frames of the decoded video)."""
        return (self.latents.shape[2] - 1) * self.settings["temporal_factor"] + 1

    @property
    def seconds(self) -> float:
        """Generation wall time (all chunks; the decode excluded)."""
        return float(sum(self.chunk_seconds))

    @property
    def frames_per_second(self) -> float:
        """Video frames generated per second of generation (decode excluded)."""
        return self.num_frames / self.seconds

    def timing(self) -> dict:
        return {"chunk_seconds": list(self.chunk_seconds), "seconds": self.seconds,
                "decode_seconds": self.decode_seconds, "frames": self.num_frames,
                "frames_per_second": self.frames_per_second}


# --------------------------------------------------------------------------------------------- rotary positions
def rope_tables(rope: torch.nn.Module, positions: torch.Tensor, grid_h: int, grid_w: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's 3-D rotary tables for tokens of frames at ``positions`` (patch-frame indices) on a ``grid_h x grid_w``
    patch grid: ``(cos, sin)``, each ``(1, len(positions) * grid_h * grid_w, 1, head_dim)``, tokens in the
    transformer's order (frame, row, column). ``rope`` is the transformer's ``WanRotaryPosEmbed``."""
    split = [rope.t_dim, rope.h_dim, rope.w_dim]
    n = positions.numel()
    out = []
    for table in (rope.freqs_cos, rope.freqs_sin):
        t, h, w = table.split(split, dim=1)
        parts = [t[positions.to(t.device)].view(n, 1, 1, -1), h[:grid_h].view(1, grid_h, 1, -1),
                 w[:grid_w].view(1, 1, grid_w, -1)]
        parts = [p.expand(n, grid_h, grid_w, -1) for p in parts]
        out.append(torch.cat(parts, dim=-1).reshape(1, n * grid_h * grid_w, 1, -1))
    return out[0], out[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs ``(x[2i], x[2i+1])`` of ``(B, L, H, D)`` by the angles of ``(cos, sin)``
    (Wan's interleaved rotary convention; the tables repeat each angle twice along D)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2).type_as(x)


# --------------------------------------------------------------------------------------------- attention
@dataclass
class _StreamState:
    """What every cached self-attention processor shares during one ``stream`` call."""

    caches: dict[str, list[RollingKVCache]]
    branch: str = "cond"
    write: bool = False
    cos: torch.Tensor | None = None  # rotary tables of [cached frames, chunk frames]
    sin: torch.Tensor | None = None
    cache_tokens: int = 0  # tokens of the cached frames (the rows of cos/sin before the chunk's)
    tokens_per_frame: int = 1


class CachedSelfAttention:
    """Self-attention of one Wan block over ``[cached clean frames, current chunk]``.

    Mirrors the block's own attention (q/k/v projections, RMS norms, rotary embedding, SDPA, output projection)
    with the keys and values of the layer's cache prepended; in write mode it also appends the chunk's
    un-rotated keys and values to the cache, after attending.
    """

    def __init__(self, state: _StreamState, layer: int):
        self.state, self.layer = state, layer
        self._memo: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        st = self.state
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        n = st.cache_tokens
        cache = st.caches[st.branch][self.layer]
        q_rot = apply_rope(q, st.cos[:, n:], st.sin[:, n:])
        k_rot = apply_rope(k, st.cos[:, n:], st.sin[:, n:])
        keys, values = k_rot, v
        if n:
            ck, cv = self._cached(cache, st)
            keys = torch.cat([ck.to(k_rot.dtype), k_rot], dim=1)
            values = torch.cat([cv.to(v.dtype), v], dim=1)
        out = F.scaled_dot_product_attention(q_rot.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        if st.write:
            frames = k.shape[1] // st.tokens_per_frame
            cache.append(k.unflatten(1, (frames, -1)), v.unflatten(1, (frames, -1)))
        return attn.to_out[1](attn.to_out[0](out))

    def _cached(self, cache: RollingKVCache, st: _StreamState) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache's keys rotated to their slot positions, and its values; memoised until the cache changes."""
        memo = self._memo.get(st.branch)
        if memo is None or memo[0] != cache.version:
            k, v = cache.keys_values()
            n = st.cache_tokens
            memo = (cache.version, apply_rope(k, st.cos[:, :n], st.sin[:, :n]), v)
            self._memo[st.branch] = memo
        return memo[1], memo[2]


@contextlib.contextmanager
def cached_self_attention(transformer: torch.nn.Module, state: _StreamState):
    """Install :class:`CachedSelfAttention` on every block's ``attn1``; restore the previous processors on exit."""
    blocks = list(transformer.blocks)
    saved = [b.attn1.processor for b in blocks]
    try:
        for i, b in enumerate(blocks):
            b.attn1.set_processor(CachedSelfAttention(state, i))
        yield
    finally:
        for b, p in zip(blocks, saved):
            b.attn1.set_processor(p)


# --------------------------------------------------------------------------------------------- the loop
def _check_model(model):
    family = getattr(model, "family", None)
    if family != "wan":
        raise ValueError(f"stream() needs a Wan model (family 'wan', e.g. fa.load_model('tiny-wan')); got "
                         f"{type(model).__name__} of family {family!r}.")
    tr = model.transformer
    if not all(hasattr(tr, a) for a in ("blocks", "rope", "config")) or not all(
            hasattr(b, "attn1") for b in tr.blocks):
        raise ValueError(f"stream() needs a WanTransformer3DModel-like transformer (blocks with attn1, rope); "
                         f"got {type(tr).__name__}.")
    if getattr(tr.config, "image_dim", None) is not None or getattr(tr.config, "added_kv_proj_dim", None):
        raise ValueError("stream() supports text-to-video Wan transformers only (no image conditioning).")


def _check_int(name: str, value, minimum: int, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an int >= {minimum}{extra}, got {value!r}.")
    return value


def stream(
    model,
    prompts: str | list[str],
    num_chunks: int,
    chunk_frames: int = 3,
    num_steps: int | None = None,
    window: int | None = 6,
    sinks: int = 3,
    sink_ema: float = DEFAULT_ALPHA,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    negative_prompt: str | list[str] | None = None,
    noise: torch.Tensor | None = None,
    cond: Conditioning | None = None,
    decode: bool = True,
    on_chunk: Callable[[int, torch.Tensor], None] | None = None,
    progress: bool = False,
) -> StreamResult:
    """Generate videos chunk by chunk with a rolling EMA-Sink KV cache (Reward Forcing's streaming inference).

    Args:
        model: a Wan FlowModel (family "wan") or anything :func:`flowalign.load_model` turns into one.
        num_chunks: chunks to generate; the video has ``num_chunks * chunk_frames`` latent frames.
        chunk_frames: latent frames per chunk (a multiple of the transformer's temporal patch size); Reward
            Forcing uses 3.
        num_steps: Euler steps per chunk over ``model.sigmas(num_steps)``; defaults to the model's own.
        window: W, the latest cached frames kept (latent frames, >= 1), or None for no eviction (then the cache
            grows with the video and must fit the RoPE table).
        sinks: S, EMA-Sink slots (latent frames, >= 0); the cache never holds more than ``S + W`` frames.
        sink_ema: alpha of ``sink <- alpha * sink + (1 - alpha) * evicted`` (0.999 in Reward Forcing; 1 keeps
            the first frames as a plain attention sink). See :mod:`flowalign.functional.ema_sink`.
        guidance_scale: CFG scale (> 1: a second, unconditional branch with its own caches); defaults to the
            model's own. Distilled causal students sample with 1.
        noise: ``(B, C, f, h, w)`` initial noise for the whole video (it also sets height and width when they are
            not given); by default each chunk draws its own from ``generator`` (``model.noise``).
        cond: an already encoded conditioning (encoded for the same guidance scale).
        on_chunk: called as ``on_chunk(i, latents_i)`` with each clean ``(B, C, chunk_frames, h, w)`` chunk as
            soon as it is done (before its cache write), e.g. to decode or display it.

    Returns:
        a :class:`StreamResult` (latents, pixels, per-chunk timings, cache sizes).
    """
    model = load_model(model)
    _check_model(model)
    num_chunks = _check_int("num_chunks", num_chunks, 1)
    chunk_frames = _check_int("chunk_frames", chunk_frames, 1)
    window = _check_int("window", window, 1, allow_none=True)
    sinks = _check_int("sinks", sinks, 0)
    if not isinstance(sink_ema, (int, float)) or isinstance(sink_ema, bool) or not 0.0 <= sink_ema <= 1.0:
        raise ValueError(f"sink_ema (the EMA-Sink alpha) must be a number in [0, 1], got {sink_ema!r}.")
    tr = model.transformer
    p_t, p_h, p_w = model.patch_size
    for name, value in (("chunk_frames", chunk_frames), ("window", window), ("sinks", sinks)):
        if value is not None and value % p_t:
            raise ValueError(f"{name} must be a multiple of the transformer's temporal patch size {p_t} "
                             f"(latent frames are patched {p_t} at a time); got {value}.")
    total = num_chunks * chunk_frames
    span = total if window is None else min(total, sinks + window + chunk_frames)
    if span // p_t > tr.rope.max_seq_len:
        raise ValueError(
            f"the attended span of {span} latent frames exceeds the transformer's RoPE table "
            f"({tr.rope.max_seq_len} patch frames): lower window/sinks/chunk_frames"
            + (", or set a finite window" if window is None else "") + ".")

    num_steps = model.default_num_steps if num_steps is None else _check_int("num_steps", num_steps, 1)
    tf = model.temporal_factor
    if noise is not None and noise.ndim == 5:  # the size of the given noise, unless named
        f = model.vae_scale_factor_spatial
        height, width = height or noise.shape[3] * f, width or noise.shape[4] * f
    height, width, _ = model.resolve_size(height, width, (total - 1) * tf + 1)
    gs = model.guidance_or_default(guidance_scale)
    if cond is None:
        cond = model.encode(prompts, guidance_scale=gs, negative_prompt=negative_prompt)
    gs, cfg = model.cfg_scale(cond, gs)
    batch = len(cond)
    shape = model.latent_shape(batch, height, width, (total - 1) * tf + 1)
    if noise is not None and tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)} "
                         f"(B, C, num_chunks * chunk_frames, h, w).")
    grid_h, grid_w = shape[3] // p_h, shape[4] // p_w
    sigmas = model.sigmas(num_steps)

    branches = ("cond", "uncond") if cfg else ("cond",)
    caches = {b: [RollingKVCache(None if window is None else window // p_t, sinks // p_t, sink_ema)
                  for _ in tr.blocks] for b in branches}
    state = _StreamState(caches, tokens_per_frame=grid_h * grid_w)
    settings = {"num_chunks": num_chunks, "chunk_frames": chunk_frames, "num_steps": num_steps, "window": window,
                "sinks": sinks, "sink_ema": float(sink_ema), "guidance_scale": gs, "height": height, "width": width,
                "temporal_factor": tf}
    result = StreamResult(latents=None, images=None, prompts=list(cond.prompts), settings=settings)
    device = model.device
    latents = torch.empty(shape, dtype=torch.float32, device=device)  # filled chunk by chunk (no final copy)

    with torch.no_grad(), cached_self_attention(tr, state):
        for i in tqdm(range(num_chunks), disable=not progress, desc="streaming", leave=False):
            t0 = time.perf_counter()
            if noise is None:
                x = model.noise(batch, height, width, (chunk_frames - 1) * tf + 1, generator=generator)
            else:
                x = noise[:, :, i * chunk_frames:(i + 1) * chunk_frames]
            x = x.float().to(device)
            held = caches["cond"][0].num_frames
            positions = torch.arange(held + chunk_frames // p_t)
            state.cos, state.sin = rope_tables(tr.rope, positions, grid_h, grid_w)
            state.cache_tokens = held * state.tokens_per_frame
            result.context_frames.append(held * p_t)
            result.cache_bytes.append(sum(c.nbytes for b in branches for c in caches[b]))
            for s, s_next in zip(sigmas[:-1], sigmas[1:]):
                v = _chunk_velocity(model, x, s, cond, gs, cfg, state)
                x = sde.step("ode", x, v, s, s_next, 0.0).x_next
            latents[:, :, i * chunk_frames:(i + 1) * chunk_frames] = x
            if on_chunk is not None:
                on_chunk(i, x)
            if i + 1 < num_chunks:
                state.write = True
                try:
                    _chunk_velocity(model, x, sigmas.new_zeros(()), cond, gs, cfg, state)
                finally:
                    state.write = False
            _sync(device)
            result.chunk_seconds.append(time.perf_counter() - t0)

        result.latents = latents
        if decode:
            t0 = time.perf_counter()
            result.images = model.decode(result.latents)
            _sync(device)
            result.decode_seconds = time.perf_counter() - t0
    return result


def _chunk_velocity(model, x, sigma, cond: Conditioning, gs: float, cfg: bool, state: _StreamState):
    """``WanModel.velocity`` on one chunk, telling the processors which branch's caches to use."""
    xin = x.to(model.dtype)
    t = model._timestep(sigma, x)
    state.branch = "cond"
    out = model.denoiser(hidden_states=xin, timestep=t, return_dict=False, **cond.cond)[0]
    if cfg:
        state.branch = "uncond"
        out_u = model.denoiser(hidden_states=xin, timestep=t, return_dict=False, **cond.uncond)[0]
        out = out_u + gs * (out - out_u)
    return out.float()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
