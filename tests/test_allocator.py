"""``RankAllocator`` against PEFT 0.21's own ``RankAllocator`` and ``AdaLoraModel.update_and_allocate``."""

import io
import types

import pytest
import torch
from torch import nn

from fastadalora.allocator import RankAllocator, mask_from_pattern
from fastadalora.backends import use_backend
from support import OpCounter

peft_layer = pytest.importorskip("peft.tuners.adalora.layer")
peft_model = pytest.importorskip("peft.tuners.adalora.model")

ADAPTER = "default"
SCHEDULE = dict(init_r=6, target_r=2, tinit=3, tfinal=5, total_step=20, deltaT=2, beta1=0.85, beta2=0.85)
SHAPES = [(6, 7, 5), (6, 4, 9), (6, 8, 8)]  # (r, in, out)


# --------------------------------------------------------------------------- models
class StandIn(nn.Module):
    """The three adapter Parameters of an ``AdaLoraLinear``."""

    def __init__(self, r, fan_in, fan_out, dtype=torch.float64):
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(r, fan_in, dtype=dtype))
        self.lora_E = nn.Parameter(torch.randn(r, 1, dtype=dtype))
        self.lora_B = nn.Parameter(torch.randn(fan_out, r, dtype=dtype))

    def adapter_params(self):
        return self.lora_A, self.lora_E, self.lora_B


class PeftStandIn(nn.Module):
    """The same Parameters named as PEFT names them: ``lora_A.default`` etc."""

    def __init__(self, layer):
        super().__init__()
        for part in ("lora_A", "lora_E", "lora_B"):
            setattr(self, part, nn.ParameterDict({ADAPTER: nn.Parameter(getattr(layer, part).detach().clone())}))


def make_layers(shapes=SHAPES, dtype=torch.float64):
    return nn.ModuleDict({str(i): StandIn(*s, dtype=dtype) for i, s in enumerate(shapes)})


def named(layers):
    return [(f"layers.{k}", m) for k, m in layers.items()]


def make_allocator(layers, **overrides):
    return RankAllocator(named(layers), **{**SCHEDULE, **overrides})


class PeftHarness:
    """PEFT's real ``RankAllocator``, driven through its real ``AdaLoraModel.update_and_allocate``."""

    def __init__(self, layers):
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict({k: PeftStandIn(m) for k, m in layers.items()})
        self.config = types.SimpleNamespace(rank_pattern=None, **{k: v for k, v in SCHEDULE.items() if k != "init_r"})
        self.allocator = peft_layer.RankAllocator(self.model, self.config, ADAPTER)
        self._self = types.SimpleNamespace(peft_config={ADAPTER: self.config}, trainable_adapter_name=ADAPTER,
                                           rankallocator=self.allocator, model=self.model)

    def update_and_allocate(self, step):
        peft_model.AdaLoraModel.update_and_allocate(self._self, step)

    def param(self, key, part):
        return getattr(self.model.layers[key], part)[ADAPTER]


def perturb_and_grad(step, layers, others=()):
    """A deterministic 'optimizer step' (same delta for every copy) and fresh gradients."""
    gen = torch.Generator().manual_seed(1000 + step)
    for key, layer in layers.items():
        for part in ("lora_A", "lora_E", "lora_B"):
            p = getattr(layer, part)
            delta = 0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            for get in (ours(layers), *others):
                q = get(key, part)
                with torch.no_grad():
                    q.add_(delta)
                q.grad = grad.clone()


def ours(layers):
    return lambda key, part: getattr(layers[key], part)


def flat_state(alloc):
    """Our flat Ī/Ū split back into ``{"layers.k.lora_X": tensor}``."""
    return {name: (i, u) for name, i, u in zip(alloc._param_names, alloc.layout.views(alloc._ipt),
                                                alloc.layout.views(alloc._unc))}


# --------------------------------------------------------------------------- PEFT equivalence
def test_matches_peft_rank_allocator_across_the_schedule():
    layers = make_layers()
    peft = PeftHarness(layers)
    alloc = make_allocator(layers)
    assert alloc.init_bgt == peft.allocator.init_bgt and alloc.target_bgt == peft.allocator.target_bgt
    saw_mask = saw_final = False
    for step in range(SCHEDULE["total_step"]):
        perturb_and_grad(step, layers, [peft.param])
        peft.update_and_allocate(step)
        alloc.update_and_allocate(step)

        # masks: PEFT's config rank pattern with the adapter name stripped
        want = peft.config.rank_pattern
        got = alloc.rank_pattern
        if want is None:
            assert got is None, step
        else:
            assert got == {k.replace(f".{ADAPTER}", ""): v for k, v in want.items()}, step
            saw_mask = True
            saw_final |= step >= SCHEDULE["total_step"] - SCHEDULE["tfinal"]
        # E values, A and B untouched
        for key, layer in layers.items():
            for part in ("lora_A", "lora_E", "lora_B"):
                assert torch.equal(getattr(layer, part), peft.param(key, part)), (step, key, part)
        # EMA buffers (PEFT's are empty after the reset at T - tfinal; ours are zeros)
        state = flat_state(alloc)
        for name, (ipt, unc) in state.items():
            key, part = name.split(".")[1], name.split(".")[2]
            pname = f"layers.{key}.{part}.{ADAPTER}"
            if pname not in peft.allocator.exp_avg_ipt:
                assert not ipt.any() and not unc.any(), (step, name)
                continue
            torch.testing.assert_close(ipt, peft.allocator.exp_avg_ipt[pname], rtol=1e-12, atol=0)
            torch.testing.assert_close(unc, peft.allocator.exp_avg_unc[pname], rtol=1e-12, atol=1e-300)
    assert saw_mask and saw_final
    final = alloc.rank_pattern
    assert sum(sum(v) for v in final.values()) == SCHEDULE["target_r"] * len(SHAPES)
    for key, layer in layers.items():  # the fixed pattern is enforced: pruned E stay zero
        flags = torch.tensor(final[f"layers.{key}.lora_E"])
        assert not layer.lora_E[~flags].any()


def test_rank_pattern_none_before_first_mask_and_keys():
    layers = make_layers()
    alloc = make_allocator(layers)
    assert alloc.rank_pattern is None
    for step in range(5):
        perturb_and_grad(step, layers)
        alloc.update_and_allocate(step)
    assert alloc.rank_pattern is not None
    assert list(alloc.rank_pattern) == [f"layers.{k}.lora_E" for k in layers]
    assert all(len(v) == 6 and all(isinstance(f, bool) for f in v) for v in alloc.rank_pattern.values())


def test_missing_gradient_names_the_parameter():
    layers = make_layers()
    alloc = make_allocator(layers)
    perturb_and_grad(0, layers)
    layers["1"].lora_B.grad = None
    with pytest.raises(RuntimeError, match=r"layers\.1\.lora_B has no gradient.*zero_grad"):
        alloc.update_and_allocate(0)


def test_k_zero_prunes_nothing():
    layers = make_layers()
    alloc = make_allocator(layers, target_r=6)  # budget never drops below init: k = 0 at every mask
    for step in range(SCHEDULE["total_step"]):
        perturb_and_grad(step, layers)
        alloc.update_and_allocate(step)
    assert all(all(v) for v in alloc.rank_pattern.values())
    assert all(layer.lora_E.all() for layer in layers.values())


def test_mask_from_pattern_zeroes_only_flagged_entries():
    Es = [torch.randn(3, 1), torch.randn(2, 1)]
    before = [e.clone() for e in Es]
    keep = torch.tensor([True, False, True, False, True])
    mask_from_pattern(Es, keep)
    assert torch.equal(Es[0], before[0] * torch.tensor([[1.0], [0.0], [1.0]]))
    assert torch.equal(Es[1], before[1] * torch.tensor([[0.0], [1.0]]))


# --------------------------------------------------------------------------- resume
def _clone_layers(layers):
    shapes = [(m.lora_A.shape[0], m.lora_A.shape[1], m.lora_B.shape[0]) for m in layers.values()]
    copy = make_layers(shapes, dtype=next(iter(layers.values())).lora_A.dtype)
    with torch.no_grad():
        for key, layer in layers.items():
            for part in ("lora_A", "lora_E", "lora_B"):
                getattr(copy[key], part).copy_(getattr(layer, part))
    return copy


@pytest.mark.parametrize("stop", [8, 15, 17])  # mid-schedule, at the phase switch, in the final phase
def test_state_dict_round_trip_continues_identically(stop):
    layers = make_layers()
    alloc = make_allocator(layers)
    for step in range(stop):
        perturb_and_grad(step, layers)
        alloc.update_and_allocate(step)
    buf = io.BytesIO()
    torch.save(alloc.state_dict(), buf)
    buf.seek(0)
    resumed_layers = _clone_layers(layers)
    resumed = make_allocator(resumed_layers)
    resumed.load_state_dict(torch.load(buf))
    assert resumed.rank_pattern == alloc.rank_pattern
    for step in range(stop, SCHEDULE["total_step"]):
        perturb_and_grad(step, layers, [ours(resumed_layers)])
        alloc.update_and_allocate(step)
        resumed.update_and_allocate(step)
        assert torch.equal(alloc._ipt, resumed._ipt) and torch.equal(alloc._unc, resumed._unc)
        assert alloc.rank_pattern == resumed.rank_pattern
        for key in layers:
            assert torch.equal(layers[key].lora_E, resumed_layers[key].lora_E)


def test_load_state_dict_rejects_other_layout():
    alloc = make_allocator(make_layers())
    other = make_allocator(make_layers(SHAPES[:2]))
    with pytest.raises(ValueError, match="saved state"):
        other.load_state_dict(alloc.state_dict())


def test_refresh_after_resize_to_saved_rank():
    from fastadalora.layers import AdaLoraLinear

    torch.manual_seed(0)
    layers = nn.ModuleDict({str(i): AdaLoraLinear(nn.Linear(i_, o_), r=6, init_lora_weights=False)
                            for i, (_, i_, o_) in enumerate(SHAPES)})
    alloc = make_allocator(layers)
    for step in range(3):
        perturb_and_grad(step, layers)
        alloc.update_and_allocate(step)
    # same shapes: refresh keeps the state
    ipt = alloc._ipt.clone()
    alloc.refresh()
    assert torch.equal(alloc._ipt, ipt)
    # a pruned checkpoint: ranks 3, 2, 4 -> the budget starts from 9, not init_r × L = 18
    for (key, layer), r in zip(layers.items(), (3, 2, 4)):
        layer.resize_rank([True] * r + [False] * (6 - r))
    alloc.refresh()
    assert alloc.ranks == [3, 2, 4] and alloc.init_bgt == 9 and alloc.target_bgt == 6
    assert not alloc._ipt.any()
    for step in range(3, SCHEDULE["total_step"]):
        perturb_and_grad(step, layers)
        alloc.update_and_allocate(step)
    assert sum(sum(v) for v in alloc.rank_pattern.values()) == 6


def test_follows_a_cast_of_the_model():
    layers = make_layers()
    alloc = make_allocator(layers)
    perturb_and_grad(0, layers)
    alloc.update_and_allocate(0)
    layers.float()  # Module._apply swaps .data (and .grad) in place: same Parameter objects
    perturb_and_grad(1, layers)
    alloc.update_and_allocate(1)
    assert alloc._ipt.dtype == torch.float32 and alloc._ipt.any()


# --------------------------------------------------------------------------- constant op count, no sync
def _ops_at(n_layers, step, warm_steps, dtype=torch.float64):
    layers = make_layers([SHAPES[i % len(SHAPES)] for i in range(n_layers)], dtype=dtype)
    alloc = make_allocator(layers)
    for s in warm_steps:
        perturb_and_grad(s, layers)
        alloc.update_and_allocate(s)
    perturb_and_grad(step, layers)
    with OpCounter() as counter:
        alloc.update_and_allocate(step)
    return counter.ops


@pytest.mark.parametrize("step,warm", [(4, [0, 1, 2, 3]), (15, [13, 14]), (17, [14, 15, 16])],
                         ids=["mask-step", "phase-switch", "final-phase"])
def test_op_count_independent_of_layer_count(step, warm):
    # 3 vs 9 layers of the same 3 shapes: the count may follow the number of distinct shapes, never L
    two, eight = _ops_at(3, step, warm), _ops_at(9, step, warm)
    assert two == eight, (two, eight)
    # one host read (the finite check of the scores) on a step that reads gradients, none otherwise
    assert two.count("_local_scalar_dense") == (1 if step < 15 else 0)
    print(f"{step}: {len(two)} ops: {two}")
    if step == 4:  # p and g gathered (cat per shape and part); means per shape and part; one kthvalue
        assert "kthvalue" in two and "mean" in two and "cat" in two and "_foreach_mul_" not in two


def test_op_count_independent_of_layer_count_triton():
    """The Triton path too (under the interpreter the launch adds its own constant argument copies)."""
    with use_backend("triton"):
        two, eight = _ops_at(3, 4, [3], torch.float32), _ops_at(9, 4, [3], torch.float32)
    assert two == eight, (two, eight)
    assert two.count("_local_scalar_dense") == 1 and "kthvalue" in two and "index_add_" not in two


# --------------------------------------------------------------------------- Triton path
def test_triton_backend_matches_torch_backend_fp32():
    torch.manual_seed(1)
    sched = dict(tinit=1, tfinal=3, total_step=10, deltaT=2)  # masks at 2, 4, 6; switch at 7; final 8, 9
    layers_t = make_layers([(4, 7, 5), (4, 300, 3), (4, 8, 8)], dtype=torch.float32)
    layers_c = _clone_layers(layers_t)
    alloc_t, alloc_c = make_allocator(layers_t, **sched), make_allocator(layers_c, **sched)
    for step in range(sched["total_step"]):
        perturb_and_grad(step, layers_t, [ours(layers_c)])
        with use_backend("triton"):
            alloc_t.update_and_allocate(step)
        with use_backend("torch"):
            alloc_c.update_and_allocate(step)
        torch.testing.assert_close(alloc_t._ipt, alloc_c._ipt, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(alloc_t._unc, alloc_c._unc, rtol=1e-5, atol=1e-7)
        assert alloc_t.rank_pattern == alloc_c.rank_pattern, step
        for key in layers_t:
            assert torch.equal(layers_t[key].lora_E, layers_c[key].lora_E), step
    assert alloc_t._table is not None  # the kernel did run


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bfloat16_runs_the_schedule(backend):
    sched = dict(tinit=1, tfinal=3, total_step=10, deltaT=2)
    shapes = [(4, 7, 5), (4, 4, 9)]
    layers = make_layers(shapes, dtype=torch.bfloat16)
    alloc = make_allocator(layers, **sched)
    for step in range(sched["total_step"]):
        perturb_and_grad(step, layers)
        with use_backend(backend):
            alloc.update_and_allocate(step)
        assert alloc._ipt.dtype == torch.float32 and torch.isfinite(alloc._ipt).all()  # fp32 state
    pattern = alloc.rank_pattern
    assert sum(sum(v) for v in pattern.values()) == SCHEDULE["target_r"] * len(shapes)
    for key, layer in layers.items():
        assert not layer.lora_E[~torch.tensor(pattern[f"layers.{key}.lora_E"])].any()
