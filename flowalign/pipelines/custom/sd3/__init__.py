"""flowalign's Stable Diffusion 3 custom pipeline folder (see ./pipeline.py)."""
