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
    assert "2 passed, 1 skipped" in run.stdout, run.stdout  # the parity tests ran, on the CPU
    table = (tmp_path / "gpu.md").read_text()
    for case in ("vision, 8 images", "ITM, 1 image x 32 captions", "evaluation, 8 images x 40"):
        assert case in table, table
    assert "images/s" in table and "pairs/s" in table
