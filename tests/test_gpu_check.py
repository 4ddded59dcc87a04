"""The GPU check's dry run: bench/gpu_check.sh --dry-run runs every step of the GPU check on this CPU at tiny
sizes (about a minute on 2 cores), so that the script still works the day a GPU is lent to the project."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("env", "checkpoint", "tests", "attention", "launch", "rms_norm", "e2e")


def test_dry_run_runs_every_step_and_prints_the_summary_last(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-5000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    assert out.rstrip().endswith(summary.rstrip()), "the summary is printed last"
    assert summary.rstrip().endswith("GPU CHECK PASSED")
    for step in STEPS:
        assert re.search(rf"^{step} +ok +\d+ +\d+$", summary, re.M), f"step {step} did not run ok:\n{summary}"
    for table in ("attention: kernel", "RMSNorm: kernel", "end to end"):
        assert table in summary
    # What comes back from the device machine: at most 8 plain files, names of letters, digits and ._-
    files = sorted(p.name for p in tmp_path.iterdir())
    assert all(p.is_file() for p in tmp_path.iterdir()) and len(files) <= 8, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    for name in ("gpu_check.log", "checkpoint.log", "summary.txt"):
        assert name in files
    for prefix in ("attention-", "rms_norm-", "e2e-"):
        assert any(f.startswith(prefix) and f.endswith(".csv") for f in files), (prefix, files)
