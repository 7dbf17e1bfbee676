"""``kernels.sensitivity`` (interpreted on CPU) against ``reference.sensitivity_update`` / ``triplet_scores``,
plus an ahead-of-time compile of every kernel config for sm_80 and sm_90."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastadalora import reference
from fastadalora.kernels import sensitivity as K

# (r, in, out): odd sizes, a row and a column longer than one BLOCK, a rank-1 layer
SHAPES = [(5, 61, 45), (3, 33, 17), (2, 257, 3), (1, 7, 300)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BETA1, BETA2 = 0.85, 0.9


def _flat_problem(shapes, dtype):
    As = [torch.randn(r, i) for r, i, _ in shapes]
    Bs = [torch.randn(o, r) for r, _, o in shapes]
    Es = [torch.randn(r, 1) for r, _, _ in shapes]
    params = As + Bs + Es  # the kernel's [A… | B… | E…] layout
    p = torch.cat([t.reshape(-1) for t in params]).to(dtype)
    g = torch.randn(p.numel()).to(dtype)
    ipt = torch.rand(p.numel()).to(dtype)
    unc = torch.rand(p.numel()).to(dtype)
    return p, g, ipt, unc


def _reference_triplets(s, shapes):
    """``reference.triplet_scores`` per layer over a flat element-score vector, concatenated."""
    n_a = sum(r * i for r, i, _ in shapes)
    n_b = sum(r * o for r, _, o in shapes)
    s_a = s[:n_a].split([r * i for r, i, _ in shapes])
    s_b = s[n_a:n_a + n_b].split([r * o for r, _, o in shapes])
    s_e = s[n_a + n_b:].split([r for r, _, _ in shapes])
    return torch.cat([reference.triplet_scores(a.view(r, i), e.view(r, 1), b.view(o, r))
                      for a, b, e, (r, i, o) in zip(s_a, s_b, s_e, shapes)])


def _rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_update_matches_reference(dtype):
    p, g, ipt, unc = _flat_problem(SHAPES, dtype)
    ref_ipt, ref_unc, ref_s = reference.sensitivity_update(p.double(), g.double(), ipt.double(), unc.double(),
                                                           BETA1, BETA2)
    ref_S = _reference_triplets(ref_s, SHAPES)
    s = torch.empty(p.numel(), dtype=torch.float32)
    S = K.sensitivity_scores(p, g, ipt, unc, K.triplet_table(SHAPES), BETA1, BETA2, element_scores=s)

    tol = reference.fp_tolerance(dtype, max(max(i, o) for _, i, o in SHAPES))
    assert ipt.dtype == unc.dtype == dtype and S.dtype == torch.float32
    assert S.shape == (sum(r for r, _, _ in SHAPES),)
    assert _rel_err(ipt, ref_ipt) <= tol
    assert _rel_err(unc, ref_unc) <= tol
    assert _rel_err(s, ref_s) <= 2 * tol
    assert _rel_err(S, ref_S) <= 2 * tol


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scores_only_reads_state(dtype):
    _, _, ipt, unc = _flat_problem(SHAPES, dtype)
    ipt0, unc0 = ipt.clone(), unc.clone()
    s = torch.empty(ipt.numel(), dtype=torch.float32)
    S = K.sensitivity_scores(None, None, ipt, unc, K.triplet_table(SHAPES), BETA1, BETA2, update=False,
                             element_scores=s)
    assert torch.equal(ipt, ipt0) and torch.equal(unc, unc0)  # state untouched
    ref_s = ipt.double() * unc.double()
    tol = reference.fp_tolerance(torch.float32, max(max(i, o) for _, i, o in SHAPES))
    assert _rel_err(s, ref_s) <= tol
    assert _rel_err(S, _reference_triplets(ref_s, SHAPES)) <= tol


def test_deterministic_and_touches_every_element():
    p, g, ipt, unc = _flat_problem(SHAPES, torch.float32)
    table = K.triplet_table(SHAPES)
    runs = []
    for _ in range(2):
        i, u = ipt.clone(), unc.clone()
        s = torch.full((p.numel(),), float("nan"))
        S = K.sensitivity_scores(p, g, i, u, table, BETA1, BETA2, element_scores=s)
        runs.append((i, u, s, S))
    assert not torch.isnan(runs[0][2]).any()  # every element belongs to exactly one triplet
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_triplet_table_layout():
    table = K.triplet_table([(2, 3, 4), (1, 5, 2)])
    # A: 6 + 5 = 11 elements, B: 8 + 2 = 10, E at 21..23
    assert table.tolist() == [
        [0, 3, 21, 11, 4, 2],
        [3, 3, 22, 12, 4, 2],
        [6, 5, 23, 19, 2, 1],
    ]


def test_rejects_float64():
    p, g, ipt, unc = _flat_problem(SHAPES[:1], torch.float64)
    with pytest.raises(TypeError, match="unsupported dtype"):
        K.sensitivity_scores(p, g, ipt, unc, K.triplet_table(SHAPES[:1]), BETA1, BETA2)


_AOT_SCRIPT = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from fastadalora.kernels import sensitivity as K
out = []
for cc in (80, 90):
    for fn, sig, cx in K.aot_configs():
        k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=cx),
                           target=GPUTarget("cuda", cc, 32))
        out.append({"cc": cc, "name": fn.__name__, "dtype": sig["p_ptr"], "cx": {a: str(b) for a, b in cx.items()},
                    "cubin": len(k.asm.get("cubin", b"")), "shared": k.metadata.shared})
print(json.dumps(out))
"""


def test_aot_compile_sm80_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * len(K.aot_configs())
    shared_limit = {80: 163 * 1024, 90: 227 * 1024}
    for r in results:
        assert r["cubin"] > 0, r
        assert r["shared"] <= shared_limit[r["cc"]], r
