"""``python -m bench.gpu_check --smoke``: the GPU validation's own checks at tiny sizes, under the Triton
interpreter on CPU, in a subprocess with a bounded time.  What needs CUDA is skipped and says so."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_passes():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:] + proc.stderr[-3000:]
    lines = out.splitlines()
    correctness = [line for line in lines if line.startswith("correctness")]
    assert len(correctness) == 10 and all("  ok  " in line for line in correctness), "\n".join(correctness)
    assert any(line.startswith("reruns") and "  ok  " in line for line in lines)
    for section in ("large indices", "timings"):  # CUDA only: skipped, saying why
        rows = [line for line in lines if line.startswith(section)]
        assert rows and all("SKIP" in line and "CUDA" in line for line in rows), rows
    assert " 0 failed" in out
