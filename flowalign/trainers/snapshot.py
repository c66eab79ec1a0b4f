"""Copies of the trainable weights that trail the live ones: the EMA, and CRD's old and sampling snapshots.

Only the parameters that train are copied (for LoRA, the adapter weights: a few MB even for FLUX), and a
snapshot is used by swapping its values into the live parameters for a forward pass and back.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecaySchedule:
    """``decay(step) = 0`` before ``start``, then ``min(initial + rate * (step - start), maximum)``.

    Written ``"start-initial-rate-maximum"`` as in Flow-Factory's configs, e.g. CRD's old snapshot
    ``"0-0.25-0.005-0.999"`` and sampling snapshot ``"75-0.0-0.0075-0.999"``; a plain number is a constant.
    """

    start: int = 0
    initial: float = 0.0
    rate: float = 0.0
    maximum: float = 0.999

    @classmethod
    def parse(cls, text: str | float) -> DecaySchedule:
        if isinstance(text, (int, float)):
            return cls(0, float(text), 0.0, float(text))
        parts = str(text).split("-")
        try:
            if len(parts) == 1:
                return cls.parse(float(parts[0]))
            start, initial, rate, maximum = parts
            out = cls(int(start), float(initial), float(rate), float(maximum))
        except ValueError:
            raise ValueError(f"A decay schedule is a number or 'start-initial-rate-maximum' (e.g. "
                             f"'0-0.25-0.005-0.999'); got {text!r}.") from None
        if not (0 <= out.initial <= 1 and 0 <= out.maximum <= 1 and out.rate >= 0 and out.start >= 0):
            raise ValueError(f"Decay schedule {text!r}: decays must lie in [0, 1], rate and start >= 0.")
        return out

    def __call__(self, step: int) -> float:
        if step < self.start:
            return 0.0
        return min(self.initial + self.rate * (step - self.start), self.maximum)


class Snapshot:
    """A trailing copy of ``params``: ``update(decay)`` does ``s <- decay s + (1 - decay) p``."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = list(params)
        self.values = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for s, p in zip(self.values, self.params):
            s.lerp_(p.detach(), 1 - decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """Run the model with the snapshot's values; the live values are restored afterwards (even on error)."""
        live = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, s in zip(self.params, self.values):
                    p.copy_(s)
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live):
                    p.copy_(v)

    def state_dict(self) -> list[torch.Tensor]:
        return [v.clone() for v in self.values]

    def load_state_dict(self, values: list[torch.Tensor]) -> None:
        if len(values) != len(self.values) or any(a.shape != b.shape for a, b in zip(values, self.values)):
            raise ValueError("The snapshot in the checkpoint does not match the model's trainable parameters.")
        self.values = [v.clone().to(s.device, s.dtype) for v, s in zip(values, self.values)]
