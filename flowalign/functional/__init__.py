"""Pure tensor maths (no models), computed in fp32."""

from flowalign.functional import ema_sink, flow, sde  # noqa: F401
