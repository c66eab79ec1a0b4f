"""Pure tensor maths (no models), computed in fp32."""

from flowalign.functional import flow, sde  # noqa: F401
