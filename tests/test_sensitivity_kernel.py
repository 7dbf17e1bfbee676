"""``kernels.sensitivity`` (interpreted on CPU) against ``reference.sensitivity_update`` / ``triplet_scores``.

Its ahead-of-time compile for sm_80 and sm_90 (spills, shared memory) is part of ``test_aot_compile.py``."""

import pytest
import torch

from fastadalora import reference
from fastadalora.flat_layout import FlatLayout
from fastadalora.kernels import sensitivity as K

# (r, in, out): odd sizes, rows and columns longer than one BLOCK_L, a rank-1 layer, ranks over one
# BLOCK_R (several programs per layer), a shape used twice (grouped in the flat layout)
SHAPES = [(5, 61, 45), (3, 33, 17), (2, 257, 3), (1, 7, 300), (33, 20, 9), (16, 5, 130), (5, 61, 45)]
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


def test_launch_table_one_row_per_triplet():
    layout = FlatLayout([(33, 20, 9), (2, 3, 4)])
    table = K.table_tensor(layout.triplet_table())
    assert table.shape == (35, K.META_COLS)
    nr = table[:, 6].tolist()
    assert nr == [16] + [0] * 15 + [16] + [0] * 15 + [1] + [2, 0]  # blocks of BLOCK_R triplets per layer
    assert sum(nr) == layout.n_triplets

