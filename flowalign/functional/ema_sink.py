"""A bounded key/value cache for streaming (chunked causal) video generation, with EMA-Sink.

Reward Forcing (EMA-Sink) generates a long video chunk by chunk; each chunk attends to the keys and values of
earlier, already clean frames. The cache keeps at most ``S + W`` frames per attention layer:

- **sink**: ``S`` slots, filled by the first ``S`` frames ever appended;
- **window**: the most recent ``W`` frames after those, oldest first.

When an append pushes the window beyond ``W`` frames, the oldest frames are evicted, oldest first, and every
evicted frame ``e`` is folded into one sink slot by an exponential moving average (keys and values alike):

    sink[j] <- alpha * sink[j] + (1 - alpha) * e,        j = n mod S,

where ``n = 0, 1, 2, ...`` counts evicted frames since the cache was created. When frames leave ``S`` at a time
(chunks of ``S`` frames, Reward Forcing's setting: 3-frame chunks, 3 sink frames, alpha = 0.999), this is the
chunk rule ``sink <- alpha * sink + (1 - alpha) * evicted_chunk`` with frames aligned slot by slot; frame by
frame it extends that rule to any chunk size, and the cache's state does not depend on how the frames were
split into appends (tested). ``alpha = 1`` keeps the first frames untouched (a plain
attention sink); ``S = 0`` is a plain sliding window (evicted frames are dropped); ``W = None`` never evicts.

Tensors are ``(B, F, T, H, D)``: batch, frames, tokens per frame, heads, head dim. The state is fp32 whatever
the input dtype; :meth:`RollingKVCache.keys_values` returns ``(B, F * T, H, D)`` in chronological slot order
(sink slots, then the window from oldest to newest).
"""

from __future__ import annotations

import torch

#: Reward Forcing's EMA-Sink decay (``compression_alpha``)
DEFAULT_ALPHA = 0.999


def ema_fold(sink: torch.Tensor, evicted: torch.Tensor, alpha: float, start: int) -> torch.Tensor:
    """Fold ``evicted`` frames, in order, into the sink slots: frame ``i`` updates slot ``(start + i) mod S``.

    Args:
        sink: ``(B, S, ...)`` the sink slots (S >= 1).
        evicted: ``(B, E, ...)`` frames leaving the window, oldest first.
        alpha: weight of the old sink, in [0, 1]; 1 leaves the sink unchanged (exactly).
        start: how many frames were folded before these (fixes which slot the first one updates).

    Returns:
        the new ``(B, S, ...)`` sink (a new tensor; the input is not modified).
    """
    if sink.shape[1] < 1:
        raise ValueError("ema_fold needs at least one sink slot.")
    if sink.shape[0] != evicted.shape[0] or sink.shape[2:] != evicted.shape[2:]:
        raise ValueError(f"evicted frames {tuple(evicted.shape)} do not match the sink {tuple(sink.shape)} "
                         "outside the frame dimension.")
    out = sink.clone()
    if alpha == 1.0:
        return out
    slots = out.shape[1]
    for i in range(evicted.shape[1]):
        j = (start + i) % slots
        out[:, j] = alpha * out[:, j] + (1 - alpha) * evicted[:, i].to(out.dtype)
    return out


class RollingKVCache:
    """Keys and values of one attention layer: ``sinks`` EMA-Sink slots plus a rolling window of ``window`` frames.

    Args:
        window: W, the most recent frames kept after the sink (>= 1), or None for no eviction.
        sinks: S, sink slots (>= 0).
        alpha: EMA-Sink decay in [0, 1] (1: plain attention sink, the first frames kept as they are).
    """

    def __init__(self, window: int | None, sinks: int = 0, alpha: float = DEFAULT_ALPHA):
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be an int >= 1 (frames) or None (no eviction), got {window!r}.")
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"sinks must be an int >= 0 (frames), got {sinks!r}.")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha (the EMA-Sink decay) must be in [0, 1], got {alpha!r}.")
        self.window, self.sinks, self.alpha = window, sinks, float(alpha)
        self.sink_k = self.sink_v = None      # (B, s, T, H, D), s <= S
        self.window_k = self.window_v = None  # (B, w, T, H, D), w <= W
        self.num_evicted = 0
        self.version = 0  # bumped by every append: lets callers memoise what they derive from the cache

    # ----------------------------------------------------------------- sizes
    @property
    def sink_frames(self) -> int:
        return 0 if self.sink_k is None else self.sink_k.shape[1]

    @property
    def window_frames(self) -> int:
        return 0 if self.window_k is None else self.window_k.shape[1]

    @property
    def num_frames(self) -> int:
        """Frames held now: at most ``S + W``."""
        return self.sink_frames + self.window_frames

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""
        return sum(t.numel() * t.element_size() for t in (self.sink_k, self.sink_v, self.window_k, self.window_v)
                   if t is not None)

    # ----------------------------------------------------------------- updates
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add a chunk's ``(B, F, T, H, D)`` keys and values (oldest frame first), then evict beyond ``W``."""
        self._check(k, v)
        k, v = k.detach().float(), v.detach().float()
        take = min(self.sinks - self.sink_frames, k.shape[1])
        if take > 0:
            self.sink_k = _cat(self.sink_k, k[:, :take].clone())
            self.sink_v = _cat(self.sink_v, v[:, :take].clone())
            k, v = k[:, take:], v[:, take:]
        if k.shape[1] > 0:
            self.window_k = _cat(self.window_k, k.clone())
            self.window_v = _cat(self.window_v, v.clone())
        self._evict()
        self.version += 1

    def _evict(self) -> None:
        if self.window is None or self.window_frames <= self.window:
            return
        n = self.window_frames - self.window
        old_k, old_v = self.window_k[:, :n], self.window_v[:, :n]
        if self.sinks > 0:  # the sink is full: frames reach the window only after it
            self.sink_k = ema_fold(self.sink_k, old_k, self.alpha, self.num_evicted)
            self.sink_v = ema_fold(self.sink_v, old_v, self.alpha, self.num_evicted)
        # a copy, so the evicted frames' storage is released rather than kept alive by a view
        self.window_k, self.window_v = self.window_k[:, n:].clone(), self.window_v[:, n:].clone()
        self.num_evicted += n

    def _check(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.ndim != 5 or v.shape != k.shape:
            raise ValueError(f"k and v must both be (B, F, T, H, D); got k {tuple(k.shape)}, v {tuple(v.shape)}.")
        if k.shape[1] < 1:
            raise ValueError("append needs at least one frame.")
        held = self.sink_k if self.sink_k is not None else self.window_k
        if held is not None and (held.shape[0] != k.shape[0] or held.shape[2:] != k.shape[2:]):
            raise ValueError(f"k {tuple(k.shape)} does not match the cached (B, F, T, H, D) = {tuple(held.shape)} "
                             "outside the frame dimension.")

    # ----------------------------------------------------------------- reads
    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(k, v)``, each ``(B, F * T, H, D)`` fp32: sink slots then the window, oldest first; None if empty."""
        if self.num_frames == 0:
            return None
        k = _cat(self.sink_k, self.window_k)
        v = _cat(self.sink_v, self.window_v)
        return k.flatten(1, 2), v.flatten(1, 2)


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return torch.cat([a, b], dim=1)
