"""Ahead-of-time compile every adapter kernel, in every configuration the launchers use, for real
GPU targets (sm_80, sm_90) without a GPU: ``triton.compile(ASTSource(...), target=GPUTarget(...))``
runs the whole pipeline down to a cubin with Triton's bundled ptxas.

The configurations are the kernel modules' own ``aot_configs()``: each rank tier × each precision class
(fp32 exact, fp32 TF32, 16-bit tensor cores, each with its most demanding operand dtypes), the other
dtype plans at one tier, and ragged (unaligned, strided) specialisations at the widest tier.  From each
cubin (Triton's bundled ``cuobjdump``) we check:

* shared memory fits the target;
* no register spills: zero local-memory stores (``STL``) in the SASS (``nvdisasm``), stack <= 64 B
  (``cuobjdump -res-usage``).

It also measures the dropout mask's cost: SASS instructions per element of a tile with the mask minus
the same tile without it (printed, and bounded).

The compiles run in subprocesses with ``TRITON_INTERPRET=0`` (under the interpreter ``@triton.jit``
gives ``InterpretedFunction``s, which ``ASTSource`` cannot compile), two in parallel.  Compiled
kernels land in Triton's usual cache (``TRITON_CACHE_DIR``), so a rerun of unchanged kernels is quick.

Run ``python tests/test_aot_compile.py`` for the table: registers, stack, spills, shared memory per job.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest
import triton
import triton.language as tl

from fastadalora.kernels.dropout import keep_mask

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # shared memory per block (opt-in maximum)
TARGETS = (80, 90)
MAX_STACK = 64
MASK_INSTRUCTIONS_PER_ELEMENT = 16  # the goal for the dropout mask (measured: ~10)
MASK_TILE = (64, 64)
MASK_WARPS = 4


# --------------------------------------------------------------------------- the mask's cost
@triton.jit
def _dropout_tile_kernel(x_ptr, out_ptr, seed, N, K, t16, MASK: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """A bf16 tile through ``where(keep, x, 0)`` (MASK) or unchanged: the difference is the mask's cost
    in the vectorised layout the adapter kernels' x tiles have."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    inside = (rows[:, None] < N) & (cols[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if MASK:
        x = tl.where(keep_mask(seed, rows[:, None], cols[None, :], t16), x, 0.0)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=inside)


def _mask_jobs() -> list[dict]:
    from fastadalora.kernels import _config

    jobs = []
    for mask in (False, True):
        jobs.append(_config.aot_job(_dropout_tile_kernel, f"mask={mask}", {"x_ptr": "bf16", "out_ptr": "bf16"},
                                    {"MASK": mask, "BLOCK_N": MASK_TILE[0], "BLOCK_K": MASK_TILE[1]},
                                    {"num_warps": MASK_WARPS}, aligned_ints=("K",)))
    return jobs


# --------------------------------------------------------------------------- the job list
def all_jobs() -> list[dict]:
    """Every (kernel, configuration, target) to compile, as JSON-able descriptions."""
    from fastadalora.kernels import adapter_backward, adapter_forward, dropout, sensitivity

    described = []
    for module, configs in (("adapter_forward", adapter_forward.aot_configs()),
                            ("adapter_backward", adapter_backward.aot_configs()),
                            ("dropout", dropout.aot_configs()),
                            ("sensitivity", sensitivity.aot_configs()),
                            ("test", _mask_jobs())):
        for i, job in enumerate(configs):
            for arch in TARGETS:
                o = job["options"]
                described.append(dict(
                    id=f"{job['fn'].__name__}[{job['label']},w{o['num_warps']},s{o.get('num_stages', 3)}]-sm{arch}",
                    module=module, kernel=job["fn"].__name__, index=i, arch=arch))
    ids = [d["id"] for d in described]
    assert len(set(ids)) == len(ids), "two AOT jobs with one name"
    return described


def _configs_of(module: str) -> list[dict]:
    import importlib

    if module == "test":
        return _mask_jobs()
    return importlib.import_module(f"fastadalora.kernels.{module}").aot_configs()


def _res_usage(cubin: bytes) -> dict:
    """Registers, stack, local memory (``cuobjdump -res-usage``), spill stores and instruction count (the
    SASS from ``nvdisasm``) of one cubin."""
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    code = [line.split("*/", 1)[1].split(";")[0].strip() for line in sass.splitlines()
            if line.strip().startswith("/*") and ";" in line]
    code = [c for c in code if c and not c.startswith("NOP")]
    return dict(regs=int(fields["REG"]), stack=int(fields["STACK"]), local=int(fields["LOCAL"]),
                spill_stores=sum(1 for c in code if re.search(r"\bSTL(\.|\s)", c)), instructions=len(code))


def _compile(jobs: list[dict]) -> dict[str, dict]:
    """Compile ``jobs`` in this process (which must have ``TRITON_INTERPRET=0``)."""
    from triton.backends.compiler import GPUTarget

    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    cache: dict[str, list[dict]] = {}
    results = {}
    for job in jobs:
        configs = cache.setdefault(job["module"], _configs_of(job["module"]))
        cfg = configs[job["index"]]
        start = time.perf_counter()
        try:
            src = triton.compiler.ASTSource(fn=cfg["fn"], signature=cfg["signature"], constexprs=cfg["constexprs"],
                                            attrs=cfg["attrs"])
            compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=cfg["options"])
            cubin = compiled.asm.get("cubin", b"")
            results[job["id"]] = dict(cubin=len(cubin), shared=compiled.metadata.shared, error=None,
                                      seconds=time.perf_counter() - start, **_res_usage(cubin))
        except Exception as exc:  # reported per job by the test
            results[job["id"]] = dict(cubin=0, shared=None, seconds=0.0, error=f"{type(exc).__name__}: {exc}"[:2000])
    return results


def compile_all(jobs: list[dict], workers: int | None = None) -> dict[str, dict]:
    """Compile ``jobs`` in ``workers`` fresh subprocesses with ``TRITON_INTERPRET=0``."""
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
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


def mask_cost(results: dict[str, dict], arch: int) -> float:
    """SASS instructions per element of the dropout mask on ``arch`` (tile with mask minus without)."""
    by_mask = {m: next(r for k, r in results.items() if k.startswith(f"_dropout_tile_kernel[mask={m},")
                       and k.endswith(f"sm{arch}")) for m in (False, True)}
    per_thread = MASK_TILE[0] * MASK_TILE[1] / (32 * MASK_WARPS)
    return (by_mask[True]["instructions"] - by_mask[False]["instructions"]) / per_thread


def table(results: dict[str, dict]) -> str:
    """A compact table of every job: registers, stack, spill stores, shared memory, seconds."""
    lines = [f"{'job':<112} {'regs':>4} {'stack':>5} {'STL':>3} {'shared':>7} {'s':>5}"]
    for job in JOBS:
        r = results[job["id"]]
        if r["error"]:
            lines.append(f"{job['id']:<112} ERROR {r['error'][:200]}")
        else:
            lines.append(f"{job['id']:<112} {r['regs']:>4} {r['stack']:>5} {r['spill_stores']:>3} "
                         f"{r['shared']:>7} {r['seconds']:>5.1f}")
    for arch in TARGETS:
        lines.append(f"dropout mask, sm_{arch}: {mask_cost(results, arch):.1f} SASS instructions per element "
                     f"(bf16 {MASK_TILE[0]}x{MASK_TILE[1]} tile, {MASK_WARPS} warps)")
    return "\n".join(lines)


JOBS = all_jobs()


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    results = compile_all(JOBS)
    print("\n" + table(results))  # shown with pytest -s (and in the log of a failing run)
    return results


@pytest.mark.parametrize("job", JOBS, ids=[j["id"] for j in JOBS])
def test_compiles_without_spills_and_fits_shared_memory(compiled, job):
    res = compiled[job["id"]]
    assert res["error"] is None, res["error"]
    assert res["cubin"] > 0
    assert res["shared"] <= SHARED_LIMIT[job["arch"]], f"{res['shared']} B > {SHARED_LIMIT[job['arch']]} B"
    assert res["spill_stores"] == 0, f"{res['spill_stores']} spill stores ({res['regs']} registers)"
    assert res["stack"] <= MAX_STACK, f"stack {res['stack']} B"


@pytest.mark.parametrize("arch", TARGETS)
def test_dropout_mask_cost(compiled, arch):
    cost = mask_cost(compiled, arch)
    print(f"\ndropout mask on sm_{arch}: {cost:.1f} SASS instructions per element")
    assert 0 < cost <= MASK_INSTRUCTIONS_PER_ELEMENT


def test_every_kernel_and_tier_is_covered():
    from fastadalora.kernels import _config, adapter_backward, adapter_forward, dropout, sensitivity

    kernels = {name for mod in (adapter_forward, adapter_backward, dropout, sensitivity) for name in vars(mod)
               if name.startswith("_") and name.endswith("_kernel")}
    assert kernels <= {j["kernel"] for j in JOBS}
    configs = adapter_forward.aot_configs() + adapter_backward.aot_configs()
    for kernel in ("_shrink_kernel", "_rank_expand_kernel", "_grad_g_kernel", "_grad_a_kernel"):
        labels = {c["label"] for c in configs if c["fn"].__name__ == kernel}
        for plan in _config.FULL_PLANS:
            for tier in _config.RANK_TIERS:
                assert any(label.startswith(_config.plan_label(plan, tier, True)) for label in labels), (kernel, tier)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        print(json.dumps(_compile(json.loads(sys.stdin.read()))))
    else:
        start = time.perf_counter()
        print(table(compile_all(JOBS)))
        print(f"{len(JOBS)} compiles in {time.perf_counter() - start:.0f} s")
