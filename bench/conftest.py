"""pytest-benchmark set-up for ``pytest bench --benchmark-only``.

pytest-benchmark times one contender per test (grouped by case, so its table shows them side
by side); the interleaved A,B,A,B comparison with ratios is ``python -m bench``.  The device is
CUDA when available, else CPU; ``FASTADALORA_BENCH_DEVICE=cpu|cuda:N`` overrides it.
"""

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from bench.harness import pick_device, sync  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return pick_device()


@pytest.fixture
def timed(benchmark, device):
    """``timed(group, fn, rounds)``: benchmark ``fn`` in ``group``, synchronising CUDA after each call."""

    def run(group: str, fn, rounds: int = 5, **extra):
        benchmark.group = group
        benchmark.extra_info.update(extra)

        def call():
            fn()
            sync(device)

        return benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)

    return run
