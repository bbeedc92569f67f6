"""``bench/gpu.sh --dry-run``: the GPU script's steps, on the CPU with tiny weights (< 60 s)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_script_dry_run(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 passed, 1 skipped" in run.stdout, run.stdout  # the parity tests ran, on the CPU
    table = (tmp_path / "gpu.md").read_text()
    cases = (
        "vision, 8 images",
        "ITM, 1 image x 32 captions",
        "evaluation, 8 images x 40",
        "two models on one device",
        "Batch API job",
        "captioner, 4 images, greedy",
        "captioner, 4 images, beam-3",
        "filter --capfilt (K=1), 8 JPEG samples",
    )
    for case in cases:
        assert case in table, table
    assert "failed" not in table, table
    assert "images/s" in table and "pairs/s" in table
