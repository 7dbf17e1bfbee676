"""The whole GPU validation of the Triton path in one command: ``python -m bench.gpu_check``.

On a CUDA machine (under 8 minutes, compilation included):

1. **correctness**: the layer's forward and backward (every kernel: shrink, expand, one pass over g,
   the partial sums, dx, dA) against the float64 reference, at an odd and a realistic shape, for
   r in {1, 8, 16, 33, 96, 256}, fp32 / fp16 / bf16, bf16 x with fp32 adapters (fp32 and bf16 compute,
   i.e. without and with autocast), dropout 0 and 0.1.  Each entry's error must stay within
   ``reference.fp_tolerance`` times the same computation on absolute values (a bound from the maths);
2. **large indices**, each in a subprocess: a column-major x with N·in > 2³¹ elements, and dropout at
   row·in + col > 2³² (the mask must match the CPU law there);
3. **bit-identical reruns** of a layer's forward and backward (no atomics anywhere);
4. **timings** (CUDA events, medians): each kernel against its cuBLAS equivalent, and the whole layer
   forward+backward against PEFT's ``SVDLinear`` and against the torch path.

It prints one compact table and exits non-zero on any mismatch.  ``--smoke`` runs the same checks at
tiny sizes under the Triton interpreter on CPU (``TRITON_INTERPRET=1``), skipping what needs CUDA and
saying so (``tests/test_gpu_check_smoke.py`` runs it in CI).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

if "--smoke" in sys.argv:  # before any kernel module is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

RANKS = (1, 8, 16, 33, 96, 256)
DROPOUTS = (0.0, 0.1)
# (name, base dtype, adapter dtype, compute dtype): fp32 compute follows torch's matmul precision
PLANS = [("fp32", torch.float32, torch.float32, torch.float32),
         ("fp16", torch.float16, torch.float16, torch.float16),
         ("bf16", torch.bfloat16, torch.bfloat16, torch.bfloat16),
         ("bf16x/fp32A", torch.bfloat16, torch.float32, torch.float32),
         ("bf16x/fp32A autocast", torch.bfloat16, torch.float32, torch.bfloat16)]
SCALE = 0.7


class Report:
    """Rows of ``(section, case, status, detail)``; FAIL rows make the exit status non-zero."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, section: str, case: str, ok: bool | None, detail: str = "") -> None:
        self.rows.append((section, case, "SKIP" if ok is None else ("ok" if ok else "FAIL"), detail))

    @property
    def failed(self) -> int:
        return sum(r[2] == "FAIL" for r in self.rows)

    def table(self) -> str:
        widths = [max(len(r[i]) for r in self.rows + [("section", "case", "status", "detail")]) for i in range(3)]
        lines = [f"{'section':<{widths[0]}}  {'case':<{widths[1]}}  {'status':<{widths[2]}}  detail"]
        lines += [f"{s:<{widths[0]}}  {c:<{widths[1]}}  {st:<{widths[2]}}  {d}" for s, c, st, d in self.rows]
        return "\n".join(lines)


# --------------------------------------------------------------------------- 1. correctness
def _coarser(*dtypes):
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def _worst(out, ref, mag, dtype, K) -> float:
    from fastadalora import reference

    if out.numel() == 0:
        return 0.0
    tol = reference.fp_tolerance(dtype, K)
    return ((out.double() - ref).abs() / (tol * mag + 1e-30)).max().item()


def layer_error(N: int, n_in: int, n_out: int, r: int, base, adapter, cdt, p: float, device, seed: int = 0) -> float:
    """Worst error of (y, dx, dA, dE, dB) of the Triton path over its bound (<= 1 passes)."""
    from fastadalora import reference
    from fastadalora.backends import draw_dropout_seed, triton_path

    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, dtype):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    x, W, b = rnd(N, n_in, dtype=base), rnd(n_out, n_in, dtype=base) / math.sqrt(n_in), rnd(n_out, dtype=base)
    A, E, B = rnd(r, n_in, dtype=adapter), rnd(r, 1, dtype=adapter), rnd(n_out, r, dtype=adapter)
    g = rnd(N, n_out, dtype=base)
    torch.manual_seed(seed)
    keep = reference.dropout_keep_mask((N, n_in), p, device=device, seed=draw_dropout_seed()) if p else None
    leaves = [t.clone().requires_grad_() for t in (x, A, E, B)]
    torch.manual_seed(seed)
    y = triton_path.adapter_linear(leaves[0], W, b, *leaves[1:], SCALE, dropout_p=p, cdt=cdt)
    y.backward(g)

    def ref(transform):
        ins = [transform(t).double().requires_grad_() for t in (x, A, E, B)]
        yr = reference.adapter_linear(ins[0], transform(W).double(), transform(b).double(), *ins[1:], SCALE, None,
                                      keep=keep, dropout_p=p)
        yr.backward(transform(g).double())
        return yr.detach(), [t.grad for t in ins]

    (y_ref, g_ref), (y_mag, g_mag) = ref(lambda t: t), ref(torch.abs)
    act, par = _coarser(base, cdt), _coarser(cdt, adapter)
    # (output, reference, bound, dtype, the reduction lengths chained into it: h over in, gs over out, ...)
    entries = [(y, y_ref, y_mag, act, n_in + r), (leaves[0].grad, g_ref[0], g_mag[0], act, n_out + r),
               (leaves[1].grad, g_ref[1], g_mag[1], par, n_out + N), (leaves[2].grad, g_ref[2], g_mag[2], par,
                                                                       n_in + n_out + N),
               (leaves[3].grad, g_ref[3], g_mag[3], par, n_in + N)]
    return max(_worst(*entry) for entry in entries)


def correctness_case(N: int, n_in: int, n_out: int, plan: int, device) -> tuple[bool, str]:
    """Every rank and dropout of one dtype plan at one shape: ``(passed, detail)``."""
    name, base, adapter, cdt = PLANS[plan]
    if device.type == "cuda" and torch.bfloat16 in (base, cdt) and not torch.cuda.is_bf16_supported():
        return True, "bf16 not supported here"
    worst, failures = 0.0, []
    start = time.perf_counter()
    for r in RANKS:
        for p in DROPOUTS:
            try:
                w = layer_error(N, n_in, n_out, r, base, adapter, cdt, p, device)
            except Exception as exc:  # a crash is a mismatch, reported with its cause
                failures.append(f"r={r} p={p}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            worst = max(worst, w)
            if not w <= 1.0:
                failures.append(f"r={r} p={p}: error {w:.2f}x the bound")
    detail = (f"N={N} {n_in}->{n_out}, r in {RANKS}, p in {DROPOUTS}: worst error {worst:.3f} of the bound, "
              f"{time.perf_counter() - start:.1f} s")
    return not failures, "; ".join(failures) or detail


def check_correctness(report: Report, device, shapes, workers: int = 1) -> None:
    """Each (shape, plan) case in this process, or (``workers`` > 1, on CUDA) in that many subprocesses at
    once: the Triton JIT compiles one kernel at a time per process, and the cases compile different ones."""
    cases = [(shape_name, shape, plan) for shape_name, shape in shapes.items() for plan in range(len(PLANS))]
    results: dict[tuple[str, int], tuple[bool, str]] = {}
    if workers <= 1:
        for shape_name, shape, plan in cases:
            results[shape_name, plan] = correctness_case(*shape, plan, device)
    else:
        running: list[tuple[tuple[str, int], subprocess.Popen]] = []
        pending = list(cases)
        while pending or running:
            while pending and len(running) < workers:
                shape_name, (N, n_in, n_out), plan = pending.pop(0)
                cmd = [sys.executable, "-m", "bench.gpu_check", "--case", f"{N},{n_in},{n_out},{plan}"]
                running.append(((shape_name, plan), subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                                     stderr=subprocess.PIPE, text=True)))
            key, proc = running.pop(0)
            out, err = proc.communicate(timeout=600)
            try:
                ok, detail = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                ok, detail = False, (err.strip().splitlines() or ["no output"])[-1][:200]
            results[key] = (ok, detail)
    for shape_name, _, plan in cases:
        ok, detail = results[shape_name, plan]
        report.add("correctness", f"{shape_name} {PLANS[plan][0]}", ok, detail)


# --------------------------------------------------------------------------- 2. large indices
_PROBES = {
    "column-major x, N*in > 2^31": r"""
import torch
from fastadalora.kernels import adapter_forward, adapter_backward
N, K, R = (1 << 20) + 37, 2049, 16          # N*K = 2^31 + ...: column offsets col*N overflow int32
x = torch.empty(K, N, dtype=torch.bfloat16, device="cuda").t()   # strides (1, N)
x.normal_()
A = torch.randn(R, K, device="cuda")
h = adapter_forward.shrink(x, A, cdt=torch.float32)
rows = torch.cat([torch.arange(64), torch.arange(N - 64, N)]).cuda()
want = x[rows].double() @ A.double().t()
err = ((h[rows].double() - want).abs() / (x[rows].double().abs() @ A.double().abs().t())).max().item()
gs = torch.randn(N, R, device="cuda")
E = torch.ones(R, 1, device="cuda")
part = adapter_backward.grad_a(gs, E, None, x, 1.0, cdt=torch.float32)
dA = part.sum(0)
cols = torch.tensor([0, 1, K // 2, K - 2, K - 1], device="cuda")
want = gs.double().t() @ x[:, cols].double()
err2 = ((dA[:, cols].double() - want).abs() / (gs.double().abs().t() @ x[:, cols].double().abs())).max().item()
print(max(err, err2))
""",
    "dropout at row*in + col > 2^32": r"""
import torch
from fastadalora import dropout
from fastadalora.kernels import adapter_forward
from fastadalora.kernels.dropout import dropout_keep_mask
N, K, R, seed, p = (1 << 22) + 5, 1025, 16, 12345, 0.1     # N*K > 2^32
x = torch.randn(N, K, dtype=torch.bfloat16, device="cuda")
A = torch.randn(R, K, device="cuda")
h = adapter_forward.shrink(x, A, seed, p, cdt=torch.float32)
start = N - 64
keep = dropout.keep_mask((64, K), seed, p, device="cpu", row_start=start).cuda()
mask_ok = torch.equal(dropout_keep_mask(seed, (64, K), p, device="cuda", row_start=start), keep)
xd = x[start:].double() * keep / (1 - p)
err = ((h[start:].double() - xd @ A.double().t()).abs() / (xd.abs() @ A.double().abs().t())).max().item()
print(err if mask_ok else float("inf"))
""",
}


def check_large_indices(report: Report, device) -> None:
    from fastadalora import reference

    tol = reference.fp_tolerance(torch.float32, 2**22)
    for name, code in _PROBES.items():
        if device.type != "cuda":
            report.add("large indices", name, None, "needs CUDA (several GB of GPU memory)")
            continue
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            report.add("large indices", name, False, proc.stderr.strip().splitlines()[-1][:200])
            continue
        rel = float(proc.stdout.strip().splitlines()[-1])
        report.add("large indices", name, rel <= tol,
                   f"relative error {rel:.2e} (bound {tol:.1e}), {time.perf_counter() - start:.0f} s")


# --------------------------------------------------------------------------- 3. bit-identical reruns
def check_reruns(report: Report, device, shape) -> None:
    from fastadalora.backends import triton_path

    N, n_in, n_out = shape
    gen = torch.Generator().manual_seed(1)
    for name, base, adapter, cdt in (PLANS[2], PLANS[3]):
        x = torch.randn(N, n_in, generator=gen).to(device=device, dtype=base)
        W = torch.randn(n_out, n_in, generator=gen).to(device=device, dtype=base)
        A, E, B = (torch.randn(*s, generator=gen).to(device=device, dtype=adapter) for s in ((33, n_in), (33, 1),
                                                                                             (n_out, 33)))
        g = torch.randn(N, n_out, generator=gen).to(device=device, dtype=base)
        runs = []
        for _ in range(2):
            leaves = [t.clone().requires_grad_() for t in (x, A, E, B)]
            torch.manual_seed(7)
            y = triton_path.adapter_linear(leaves[0], W, None, *leaves[1:], SCALE, dropout_p=0.1, cdt=cdt)
            y.backward(g)
            runs.append([y.detach()] + [t.grad for t in leaves])
        same = all(torch.equal(a, b) for a, b in zip(*runs))
        report.add("reruns", f"{name} N={N} {n_in}->{n_out} r=33 p=0.1", same, "y, dx, dA, dE, dB bit-identical"
                   if same else "outputs differ between two identical runs")


# --------------------------------------------------------------------------- 4. timings
def _cuda_time(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check_timings(report: Report, device, N: int = 4096, n_in: int = 4096, n_out: int = 4096, r: int = 16) -> None:
    if device.type != "cuda":
        report.add("timings", "kernels vs cuBLAS, layer vs PEFT and the torch path", None, "needs CUDA")
        return
    from fastadalora.kernels import adapter_backward as bwd
    from fastadalora.kernels import adapter_forward as fwd

    for name, base, adapter, cdt in (PLANS[2], PLANS[4]):
        x = torch.randn(N, n_in, device=device, dtype=base)
        g = torch.randn(N, n_out, device=device, dtype=base)
        A, E, B = (torch.randn(*s, device=device, dtype=adapter) for s in ((r, n_in), (r, 1), (n_out, r)))
        h = torch.randn(N, r, device=device)
        y, dx = torch.randn(N, n_out, device=device, dtype=base), torch.randn(N, n_in, device=device, dtype=base)
        Ac, Bc, hc = A.to(cdt), B.to(cdt), h.to(cdt)  # cuBLAS takes one dtype
        pairs = {
            "shrink  h = x·Aᵀ": (lambda: fwd.shrink(x, A, cdt=cdt), lambda: torch.mm(x, Ac.t())),
            "shrink + dropout 0.1": (lambda: fwd.shrink(x, A, 5, 0.1, cdt=cdt), lambda: torch.mm(x, Ac.t())),
            "expand  y += s·Bᵀ": (lambda: fwd.expand_(y, h, E, None, B, 1.0, cdt), lambda: y.addmm_(hc, Bc.t())),
            "grad_g  gs, P (one pass)": (lambda: bwd.grad_g(g, B, h, cdt),
                                        lambda: (torch.mm(g, Bc), torch.mm(g.t(), hc))),
            "grad_x  dx += dh·A ⊙ keep": (lambda: bwd.grad_x_(dx, h, E, None, A, 1.0, 5, 0.1, cdt),
                                         lambda: dx.addmm_(hc, Ac)),
            "grad_a  dA = dhᵀ·x": (lambda: bwd.grad_a(h, E, None, x, 1.0, cdt=cdt), lambda: torch.mm(hc.t(), x)),
        }
        for what, (ours, cublas) in pairs.items():
            t_ours, t_ref = _cuda_time(ours), _cuda_time(cublas)
            report.add("timings", f"{name}: {what}", True, f"{t_ours:.3f} ms vs cuBLAS {t_ref:.3f} ms "
                       f"(x{t_ours / t_ref:.2f}), N={N} {n_in}->{n_out} r={r}")
    _layer_timings(report, device, N, n_in, n_out, r)


def _layer_timings(report: Report, device, N, n_in, n_out, r) -> None:
    try:
        from bench.cases import setup_layers
    except ImportError as exc:
        report.add("timings", "layer fwd+bwd", None, f"bench.cases unavailable ({exc})")
        return
    from fastadalora.backends import use_backend

    for dtype, adapter in ((torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)):
        try:
            s = setup_layers(N, n_in, n_out, r, dtype, device, dropout=0.1, adapter_dtype=adapter)
        except ImportError as exc:
            report.add("timings", "layer fwd+bwd vs PEFT", None, f"peft not installed ({exc})")
            return
        x, gy = s["x"], s["gy"]

        def full(layer, backend=None):
            def run():
                x.grad = None
                if backend is None:
                    y = layer(x)
                else:
                    with use_backend(backend):
                        y = layer(x)
                y.backward(gy.to(y.dtype))
            return run

        t = {k: _cuda_time(fn, repeats=10) for k, fn in (("triton", full(s["ours"])),
                                                         ("torch", full(s["ours"], "torch")),
                                                         ("peft", full(s["peft_adalora"])),
                                                         ("bare", full(s["bare"])))}
        report.add("timings", f"layer fwd+bwd, {str(dtype)[6:]} base, {str(adapter)[6:]} adapter, p=0.1", True,
                   f"triton {t['triton']:.2f} ms, torch path {t['torch']:.2f} ms, PEFT SVDLinear {t['peft']:.2f} ms, "
                   f"bare {t['bare']:.2f} ms (triton/PEFT x{t['triton'] / t['peft']:.2f})")


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes under the Triton interpreter on CPU")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # N,in,out,plan: one correctness case (a worker)
    args = parser.parse_args(argv)
    if args.case:
        N, n_in, n_out, plan = (int(v) for v in args.case.split(","))
        torch.set_float32_matmul_precision("highest")
        print(json.dumps(correctness_case(N, n_in, n_out, plan, torch.device("cuda"))))
        return 0
    if args.smoke:
        device = torch.device("cpu")
        shapes = {"odd": (37, 61, 45), "multi-tile": (150, 70, 300)}
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke for the CPU (interpreter) version", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        shapes = {"odd": (37, 61, 45), "realistic": (4096, 4096, 4096)}
    torch.set_float32_matmul_precision("highest")  # fp32 checks are against exact products
    report = Report()
    start = time.perf_counter()
    check_correctness(report, device, shapes, workers=1 if args.smoke else min(10, os.cpu_count() or 1))
    check_large_indices(report, device)
    check_reruns(report, device, shapes["odd"] if args.smoke else (4096, 1024, 1024))
    check_timings(report, device)
    print(report.table())
    print(f"{len(report.rows)} checks, {report.failed} failed, {time.perf_counter() - start:.0f} s "
          f"({'interpreter on CPU' if args.smoke else torch.cuda.get_device_name(device)})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.rows, f, indent=1)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
