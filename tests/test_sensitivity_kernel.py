"""``kernels.sensitivity`` (interpreted on CPU) against ``reference.sensitivity_update`` / ``triplet_scores``,
plus an ahead-of-time compile of every kernel config for sm_80 and sm_90."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastadalora import reference
from fastadalora.flat_layout import FlatLayout
from fastadalora.kernels import sensitivity as K

# (r, in, out): odd sizes, a row and a column longer than one BLOCK, a rank-1 layer
SHAPES = [(5, 61, 45), (3, 33, 17), (2, 257, 3), (1, 7, 300)]
BETA1, BETA2 = 0.85, 0.9


def _flat_problem(shapes):
    """p, g and the EMAs as flat fp32 buffers in ``FlatLayout``'s ``[A… | B… | E…]`` layout."""
    layout = FlatLayout(shapes)
    return layout, torch.randn(layout.n), torch.randn(layout.n), torch.rand(layout.n), torch.rand(layout.n)


def _reference_triplets(s, layout):
    """``reference.triplet_scores`` per layer over a flat element-score vector, in the layout's triplet order."""
    views = layout.views(s)
    L = len(layout)
    return torch.cat([reference.triplet_scores(views[k], views[2 * L + k], views[L + k]) for k in range(L)])


def _rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def test_update_matches_reference():
    layout, p, g, ipt, unc = _flat_problem(SHAPES)
    ref_ipt, ref_unc, ref_s = reference.sensitivity_update(p.double(), g.double(), ipt.double(), unc.double(),
                                                           BETA1, BETA2)
    ipt_new, unc_new = torch.empty_like(ipt), torch.empty_like(unc)
    ipt0, unc0 = ipt.clone(), unc.clone()
    S = K.sensitivity_scores(p, g, ipt, unc, K.table_tensor(layout.triplet_table()), BETA1, BETA2,
                             ipt_out=ipt_new, unc_out=unc_new)
    tol = reference.fp_tolerance(torch.float32, max(max(i, o) for _, i, o in SHAPES))
    assert torch.equal(ipt, ipt0) and torch.equal(unc, unc0)  # the old state is kept: the new one is elsewhere
    assert S.dtype == torch.float32 and S.shape == (layout.n_triplets,)
    assert _rel_err(ipt_new, ref_ipt) <= tol
    assert _rel_err(unc_new, ref_unc) <= tol
    assert _rel_err(S, _reference_triplets(ref_s, layout)) <= 2 * tol


def test_scores_only_reads_state():
    layout, _, _, ipt, unc = _flat_problem(SHAPES)
    ipt0, unc0 = ipt.clone(), unc.clone()
    S = K.sensitivity_scores(None, None, ipt, unc, K.table_tensor(layout.triplet_table()), BETA1, BETA2)
    assert torch.equal(ipt, ipt0) and torch.equal(unc, unc0)  # state untouched
    tol = reference.fp_tolerance(torch.float32, max(max(i, o) for _, i, o in SHAPES))
    assert _rel_err(S, _reference_triplets(ipt.double() * unc.double(), layout)) <= tol


def test_deterministic_and_touches_every_element():
    layout, p, g, ipt, unc = _flat_problem(SHAPES)
    table = K.table_tensor(layout.triplet_table())
    runs = []
    for _ in range(2):
        i, u = torch.full_like(ipt, float("nan")), torch.full_like(unc, float("nan"))
        S = K.sensitivity_scores(p, g, ipt, unc, table, BETA1, BETA2, ipt_out=i, unc_out=u)
        runs.append((i, u, S))
    assert not torch.isnan(runs[0][0]).any()  # every element belongs to exactly one triplet
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_triplet_table_layout():
    table = FlatLayout([(2, 3, 4), (1, 5, 2)]).triplet_table()
    # A: 6 + 5 = 11 elements, B: 8 + 2 = 10, E at 21..23
    assert [list(r) for r in table] == [
        [0, 3, 21, 11, 4, 2],
        [3, 3, 22, 12, 4, 2],
        [6, 5, 23, 19, 2, 1],
    ]


def test_rejects_other_dtypes():
    layout, p, g, ipt, unc = _flat_problem(SHAPES[:1])
    with pytest.raises(TypeError, match="fp32"):
        K.sensitivity_scores(p.double(), g, ipt, unc, K.table_tensor(layout.triplet_table()), BETA1, BETA2)


_AOT_SCRIPT = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from fastadalora.kernels import sensitivity as K
out = []
for cc in (80, 90):
    for fn, sig, cx in K.aot_configs():
        k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=cx),
                           target=GPUTarget("cuda", cc, 32))
        out.append({"cc": cc, "name": fn.__name__, "cx": {a: str(b) for a, b in cx.items()},
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
