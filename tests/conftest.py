"""Test set-up shared by every test file.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, i.e. before the kernel
modules are imported, so it is set here at collection time.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny test models are dominated by thread start-up cost: one thread is ~10x faster on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
