"""Ahead-of-time compile every adapter kernel, in every configuration the launchers use, for real
GPU targets (sm_80, sm_90) without a GPU: ``triton.compile(ASTSource(...), target=GPUTarget(...))``
runs the whole pipeline down to a cubin with Triton's bundled ptxas.

The configurations are those the launchers would pick: each dtype (fp32, fp16, bf16) × each rank
tier (``RANK_TIERS``, via ``kernel_config``) × with/without dropout for the kernels that drop.  We
check that a cubin comes out and that its shared memory fits the target.

The compiles run in subprocesses with ``TRITON_INTERPRET=0`` (under the interpreter ``@triton.jit``
gives ``InterpretedFunction``s, which ``ASTSource`` cannot compile), two in parallel.  Compiled
kernels land in Triton's usual cache (``TRITON_CACHE_DIR``), so a rerun of unchanged kernels is quick.

Run ``python tests/test_aot_compile.py`` for a table of every configuration and its shared memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

# shared memory per block (opt-in maximum) of each target
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TARGETS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")

# (module, kernel, has HAS_DROPOUT, reduces over the rank, tile constexprs it takes)
KERNELS = [
    ("adapter_forward", "_shrink_kernel", True, False, ("BLOCK_N", "BLOCK_K", "BLOCK_R")),
    ("adapter_forward", "_rank_expand_kernel", True, True, ("BLOCK_N", "BLOCK_K", "BLOCK_R")),
    ("adapter_backward", "_grad_s_kernel", False, False, ("BLOCK_N", "BLOCK_OUT", "BLOCK_R")),
    ("adapter_backward", "_grad_a_kernel", True, False, ("BLOCK_N", "BLOCK_K", "BLOCK_R")),
    ("adapter_backward", "_grad_b_kernel", False, False, ("BLOCK_N", "BLOCK_OUT", "BLOCK_R")),
]
# pointer arguments in the input dtype; every other pointer is fp32 (or u8 for the mask)
DTYPE_POINTERS = {"x_ptr", "a_ptr", "b_ptr", "y_ptr", "g_ptr", "dx_ptr", "right_ptr", "out_ptr"}
FLOAT_SCALARS = {"p", "keep_scale", "scale"}


def all_jobs() -> list[dict]:
    """Every (kernel, configuration, target) the launchers can produce, deduplicated."""
    import torch

    from fastadalora.kernels.adapter_forward import RANK_TIERS, kernel_config

    torch_dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    jobs: dict[str, dict] = {}
    for module, kernel, drops, reduces_rank, tiles in KERNELS:
        for dtype in DTYPES:
            for tier in RANK_TIERS:
                cfg = kernel_config(tier, torch_dtypes[dtype], reduces_rank=reduces_rank)
                for dropout in ((False, True) if drops else (None,)):
                    constexprs = {"DOT_DTYPE": dtype, **{t: getattr(cfg, t) for t in tiles}}
                    if dropout is not None:
                        constexprs["HAS_DROPOUT"] = dropout
                    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                    for arch in TARGETS:
                        desc = ",".join(f"{k}={v}" for k, v in sorted(constexprs.items()))
                        job_id = f"{kernel}[{desc},w{cfg.num_warps},s{cfg.num_stages}]-sm{arch}"
                        jobs[job_id] = dict(id=job_id, module=module, kernel=kernel, dtype=dtype,
                                            constexprs=constexprs, options=options, arch=arch)
    for arch in TARGETS:
        job_id = f"_keep_mask_kernel[BLOCK_K=64,BLOCK_N=64]-sm{arch}"
        jobs[job_id] = dict(id=job_id, module="dropout", kernel="_keep_mask_kernel", dtype="u8",
                            constexprs={"BLOCK_N": 64, "BLOCK_K": 64}, options={"num_warps": 4}, arch=arch)
    return list(jobs.values())


def _compile(jobs: list[dict]) -> dict[str, dict]:
    """Compile ``jobs`` in this process (which must have ``TRITON_INTERPRET=0``)."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    tl_dtypes = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}
    results = {}
    for job in jobs:
        fn = getattr(importlib.import_module(f"fastadalora.kernels.{job['module']}"), job["kernel"])
        constexprs = dict(job["constexprs"])
        if "DOT_DTYPE" in constexprs:
            constexprs["DOT_DTYPE"] = tl_dtypes[constexprs["DOT_DTYPE"]]
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = "*" + (job["dtype"] if name in DTYPE_POINTERS or job["dtype"] == "u8" else "fp32")
            else:
                signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
        start = time.perf_counter()
        try:
            compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
            results[job["id"]] = dict(cubin=len(compiled.asm.get("cubin", b"")), ptx=len(compiled.asm.get("ptx", "")),
                                      shared=compiled.metadata.shared, error=None,
                                      seconds=time.perf_counter() - start)
        except Exception as exc:  # reported per job by the test
            results[job["id"]] = dict(cubin=0, ptx=0, shared=None, seconds=0.0,
                                      error=f"{type(exc).__name__}: {exc}"[:2000])
    return results


def compile_all(jobs: list[dict], workers: int | None = None) -> dict[str, dict]:
    """Compile ``jobs`` in ``workers`` fresh subprocesses with ``TRITON_INTERPRET=0``."""
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    chunks = [jobs[i::workers] for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
             for chunk in chunks if chunk]
    results: dict[str, dict] = {}
    for proc, chunk in zip(procs, chunks):
        out, err = proc.communicate(json.dumps(chunk))
        assert proc.returncode == 0, f"AOT compile worker failed:\n{err[-4000:]}"
        results.update(json.loads(out.strip().splitlines()[-1]))
    return results


JOBS = all_jobs()


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    return compile_all(JOBS)


@pytest.mark.parametrize("job", JOBS, ids=[j["id"] for j in JOBS])
def test_compiles_and_fits_shared_memory(compiled, job):
    res = compiled[job["id"]]
    assert res["error"] is None, res["error"]
    assert res["cubin"] > 0 and res["ptx"] > 0
    assert res["shared"] <= SHARED_LIMIT[job["arch"]], f"{res['shared']} B > {SHARED_LIMIT[job['arch']]} B"


def test_every_kernel_and_tier_is_covered():
    from fastadalora.kernels import adapter_backward, adapter_forward, dropout
    from fastadalora.kernels.adapter_forward import RANK_TIERS

    kernels = {name for mod in (adapter_forward, adapter_backward, dropout) for name in vars(mod)
               if name.startswith("_") and name.endswith("_kernel")}
    assert kernels == {j["kernel"] for j in JOBS}
    shrink_tiers = {j["constexprs"]["BLOCK_R"] for j in JOBS if j["kernel"] == "_shrink_kernel"}
    assert shrink_tiers == set(RANK_TIERS)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        print(json.dumps(_compile(json.loads(sys.stdin.read()))))
    else:  # a table of every configuration and its shared memory
        table = compile_all(JOBS)
        for job in JOBS:
            res = table[job["id"]]
            print(f"{job['id']:<100} shared={res['shared']!s:>7} cubin={res['cubin']:>7} "
                  f"{res['seconds']:.2f}s {res['error'] or ''}")
