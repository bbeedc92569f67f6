"""Test helpers: random checkpoints in the real on-disk formats (``make_checkpoint``)."""
