"""flowalign's Wan 2.1 custom pipeline folder (see ./pipeline.py)."""
