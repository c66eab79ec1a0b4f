"""flowalign's FLUX.1 custom pipeline folder (see ./pipeline.py)."""
