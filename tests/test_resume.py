"""Exact resume: 24 steps straight == 12 (or 18) steps, torch.save, a NEW process loads and trains the rest.

Bit-identical (``torch.equal``) adapter and head weights, rank pattern and allocator state, on CPU in
float32 with fixed seeds.  The checkpoint at step 12 lies in the budgeting phase (masks every
deltaT=2 steps); the one at step 18 inside the final fixed-pattern phase (total_step=24, tfinal=8:
the pattern is fixed at step 16).  The worker is ``tests/resume_worker.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("resume_worker.py")


def _worker(*args) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"resume_worker failed:\n{out}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One straight run (saving checkpoints at 12 and 18 in passing), then two resumed runs in parallel."""
    d = tmp_path_factory.mktemp("resume")
    _wait(_worker("--start", 0, "--stop", 24, "--save-at", 12, 18, "--ckpt-dir", d, "--out", d / "straight.pt"))
    resumed = {s: _worker("--start", s, "--stop", 24, "--resume", d / f"step{s}.pt", "--out", d / f"from{s}.pt")
               for s in (12, 18)}
    for proc in resumed.values():
        _wait(proc)
    load = lambda p: torch.load(p, weights_only=True)  # noqa: E731
    return load(d / "straight.pt"), {s: load(d / f"from{s}.pt") for s in resumed}


def _assert_identical(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("resume_at", [12, 18], ids=["budgeting-phase", "final-fixed-phase"])
def test_resume_is_bit_identical(runs, resume_at):
    straight, resumed = runs
    other = resumed[resume_at]
    assert straight["rank_pattern"] is not None
    # something was actually pruned and the run trained the heads and adapters
    assert sum(sum(v) for v in straight["rank_pattern"].values()) == 2 * len(straight["rank_pattern"])
    assert any("classifier" in k for k in straight["trainable"])
    _assert_identical(straight["trainable"], other["trainable"], "trainable")
    _assert_identical(straight["rank_pattern"], other["rank_pattern"], "rank_pattern")
    _assert_identical(straight["allocator"], other["allocator"], "allocator")
