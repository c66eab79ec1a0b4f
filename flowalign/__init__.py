"""flowalign: align diffusion/flow generators (SD3, FLUX, Wan) with rewards."""

__version__ = "0.1.0"
