"""Timing and device helpers shared by every benchmark case.

Every comparison is timed *interleaved*: one process, identical weights and inputs, and the
contenders called in turn (A, B, C, A, B, C, ...) so that a slow phase of a shared machine hits
them alike; each contender's time is the median of its repeats.  On CUDA each call is bracketed
by ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch


def pick_device(name: str | None = None) -> torch.device:
    """``name``, else ``$FASTADALORA_BENCH_DEVICE``, else CUDA when available, else CPU."""
    name = name or os.environ.get("FASTADALORA_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = 10,
                warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn ``repeats`` times.

    ``fns`` maps a contender's name to a no-argument callable; the order of names rotates every
    round so that none is always first after a pause.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN when ``b`` is not positive (never raises on a degenerate timing)."""
    return a / b if b > 0 else float("nan")
