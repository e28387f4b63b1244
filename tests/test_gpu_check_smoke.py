"""bench/gpu_check.sh --smoke: the GPU check's code paths on the CPU at toy sizes, so the script that
only a GPU machine runs in full is known to work (no GPU in CI; see README, Benchmarks)."""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from gpu_check import ROWS  # noqa: E402


def test_gpu_check_smoke_prints_every_row(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["OUT"] = str(tmp_path)  # the GPU runner's collection folder
    env["GPU_CHECK_PYTHON"] = sys.executable  # this test's interpreter, wherever its environment lives
    start = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)  # a hang guard only
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "nvidia-smi" in out and "torch " in out and "CUDA runtime" in out  # the machine comes first
    table = out[out.index("| check | setting | result | goal | verdict |"):]
    for row in ROWS:
        line = next((line for line in table.splitlines() if line.startswith(f"| {row} |")), None)
        assert line is not None, f"row {row!r} missing from\n{table}"
        assert "error" not in line and "FAILED" not in line and "skipped" not in line, line
    written = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {row} |" in written for row in ROWS)
    assert (tmp_path / "gpu_check.json").exists()
    print(f"\ngpu_check.sh --smoke: {seconds:.1f} s")
