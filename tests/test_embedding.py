"""AdaLoraEmbedding: the formula, gradients, the base embedding's options, merge, allocation, checkpoints."""

import json
import types
import warnings

import pytest
import torch
from torch import nn

import fastadalora
from fastadalora import AdaLoraConfig, reference
from fastadalora.layers.embedding import AdaLoraEmbedding

NUM, DIM = 23, 12


def _layer(r=5, dtype=torch.float64, seed=0, **emb_kwargs):
    torch.manual_seed(seed)
    base = nn.Embedding(NUM, DIM, **emb_kwargs).to(dtype)
    layer = AdaLoraEmbedding(base, r=r, lora_alpha=8)
    with torch.no_grad():
        layer.lora_E.normal_()  # a trained-looking adapter (E = 0 at init)
    return layer


def _formula(layer, x):
    """``W0[x] + (Aᵀ[x]·diag(E)·Bᵀ)·scaling/(ranknum+1e-5)``, written out with plain indexing."""
    A, E, B = layer.adapter_params()
    w0 = layer.base_layer.weight
    h = A.t()[x]  # (..., r)
    branch = (h * E.reshape(-1)) @ B.t() * layer.scaling / (layer.ranknum + 1e-5)
    return w0[x] + branch.to(w0.dtype)


def _ids(*shape, seed=1):
    return torch.randint(0, NUM, shape, generator=torch.Generator().manual_seed(seed))


def test_shapes_names_and_init():
    layer = AdaLoraEmbedding(nn.Embedding(NUM, DIM), r=4)
    assert (layer.in_features, layer.out_features) == (NUM, DIM)
    assert layer.lora_A.shape == (4, NUM) and layer.lora_E.shape == (4, 1) and layer.lora_B.shape == (DIM, 4)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_E", "lora_B"}
    x = _ids(3, 5)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)  # E = 0: an exact no-op


def test_gradcheck_float64():
    layer = _layer()
    x = _ids(4, 6)  # repeated ids: the gradient of A accumulates over tokens
    A, E, B = layer.adapter_params()
    assert torch.autograd.gradcheck(lambda *_: layer(x), (A, E, B))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equals_formula(dtype):
    layer = _layer(dtype=dtype)
    x = _ids(3, 7)
    g = torch.randn(3, 7, DIM, dtype=dtype)
    y = layer(x)
    y.backward(g)
    ours = [p.grad.clone() for p in layer.adapter_params()]
    layer.zero_grad()
    y_ref = _formula(layer, x)
    y_ref.backward(g)
    tol = 1e-12 if dtype == torch.float64 else reference.fp_tolerance(dtype, 21)  # B's grad reduces over 21 tokens
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    for got, p in zip(ours, layer.adapter_params()):
        torch.testing.assert_close(got, p.grad, rtol=tol, atol=tol * p.grad.abs().max().item())


def test_half_precision_base_fp32_adapter_one_rounding():
    torch.manual_seed(0)
    layer = AdaLoraEmbedding(nn.Embedding(NUM, DIM).bfloat16(), r=5, adapter_dtype=torch.float32)
    nn.init.normal_(layer.lora_E)
    x = _ids(2, 9)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    A, E, B = layer.adapter_params()
    exact = layer.base_layer.weight[x].float() + (A.t()[x] * E.reshape(-1)) @ B.t() * layer.scale
    # the fp32 sum rounded once to bf16 (8 significant bits): within half an ulp, plus the fp32 branch error
    bound = exact.abs() * (2.0**-8 + reference.fp_tolerance(torch.float32, 5))
    assert ((y.float() - exact).abs() <= bound).all()


def test_padding_idx_keeps_the_padding_vector():
    pad = 3
    layer = _layer(padding_idx=pad)
    assert torch.count_nonzero(layer.lora_A[:, pad]) == 0  # zeroed at init
    x = torch.tensor([[pad, 1, 2, pad], [4, pad, 5, 6]])
    opt = torch.optim.AdamW(layer.adapter_params(), lr=0.1)
    for _ in range(3):  # a few steps with the orthogonal term too: the padding column stays zero
        A, B = layer.lora_A, layer.lora_B
        eye = torch.eye(layer.r, dtype=A.dtype)
        loss = layer(x).square().sum() + (A @ A.t() - eye).norm() + (B.t() @ B - eye).norm()  # PEFT's orthogonal term
        loss.backward()
        assert torch.count_nonzero(layer.lora_A.grad[:, pad]) == 0
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(layer(x)[x == pad], layer.base_layer(x)[x == pad], rtol=0, atol=0)


def test_scale_grad_by_freq_scales_A_grad_as_the_base_does():
    layer = _layer(scale_grad_by_freq=True)
    x = torch.tensor([[1, 1, 1, 2], [2, 5, 1, 7]])
    g = torch.randn(2, 4, DIM, dtype=torch.float64)
    layer(x).backward(g)
    A, E, B = layer.adapter_params()
    gh = (g @ B) * E.reshape(-1) * layer.scale  # upstream gradient of Aᵀ[x], (2, 4, r)
    counts = torch.bincount(x.reshape(-1), minlength=NUM).double()
    expected = torch.zeros(NUM, layer.r, dtype=torch.float64).index_add_(
        0, x.reshape(-1), gh.reshape(-1, layer.r) / counts[x.reshape(-1)].unsqueeze(1))
    torch.testing.assert_close(A.grad, expected.t(), rtol=1e-12, atol=1e-12)


def test_max_norm_renormalises_the_looked_up_columns_of_A_as_peft_lora():
    layer = _layer(max_norm=0.05)
    A_before = layer.lora_A.detach().clone()
    x = torch.tensor([[0, 4, 4, 9]])
    y = layer(x)
    used = torch.tensor([0, 4, 9])
    norms = layer.lora_A.detach()[:, used].norm(dim=0)
    assert (norms <= 0.05 + 1e-12).all()
    others = torch.ones(NUM, dtype=torch.bool)
    others[used] = False
    assert torch.equal(layer.lora_A.detach()[:, others], A_before[:, others])
    torch.testing.assert_close(y, _formula(layer, x), rtol=1e-12, atol=1e-12)  # with the renormalised A


def test_embed_scale_scales_the_branch():
    class Scaled(nn.Embedding):  # Gemma-style: the base scales its output
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.register_buffer("embed_scale", torch.tensor(3.0, dtype=torch.float64))

        def forward(self, x):
            return super().forward(x) * self.embed_scale

    torch.manual_seed(0)
    layer = AdaLoraEmbedding(Scaled(NUM, DIM).double(), r=4)
    nn.init.normal_(layer.lora_E)
    x = _ids(2, 5)
    torch.testing.assert_close(layer(x), _formula(layer, x) * 3.0, rtol=1e-12, atol=1e-12)


def test_merge_unmerge_and_delta_weight_layout():
    layer = _layer()
    w0 = layer.base_layer.weight.detach().clone()
    x = _ids(3, 4)
    y = layer(x)
    dw = layer.get_delta_weight()
    assert dw.shape == (NUM, DIM)
    torch.testing.assert_close(dw[x], y - w0[x], rtol=1e-12, atol=1e-12)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-15)


def test_resize_rank_keeps_the_output():
    layer = _layer()
    with torch.no_grad():
        layer.lora_E[[1, 3]] = 0
    x = _ids(2, 6)
    y = layer(x)
    layer.resize_rank([True, False, True, False, True])
    assert layer.r == 3 and layer.ranknum == 5.0
    torch.testing.assert_close(layer(x), y, rtol=1e-12, atol=1e-12)


def test_errors_name_the_layer_and_repr_reads_no_values():
    layer = AdaLoraEmbedding(nn.Embedding(NUM, DIM), r=4, name="model.wte")
    with pytest.raises(TypeError, match=r"model\.wte.*integer indices"):
        layer(torch.randn(2, 3))
    with pytest.raises(TypeError, match="must be torch.nn.Embedding"):
        AdaLoraEmbedding(nn.Linear(3, 3), name="x")
    with pytest.warns(UserWarning, match="lora_dropout=0.1 is not applied"):
        AdaLoraEmbedding(nn.Embedding(NUM, DIM), r=4, lora_dropout=0.1)
    on_meta = AdaLoraEmbedding(nn.Embedding(NUM, DIM, padding_idx=0, device="meta"), r=4)
    assert on_meta.lora_A.device.type == "meta"
    assert "in_features=23" in repr(on_meta) and "padding_idx=0" in repr(on_meta)


# --------------------------------------------------------------------------- in a model
class TinyLM(nn.Module):
    """Embedding → Linear → mean over tokens → classifier; ``forward(input_ids, labels)`` returns ``.loss``."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(NUM, DIM, padding_idx=0)
        self.proj = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, 3)

    def forward(self, input_ids, labels=None):
        logits = self.head(torch.tanh(self.proj(self.emb(input_ids))).mean(1))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return types.SimpleNamespace(loss=loss, logits=logits)


SCHED = dict(init_r=6, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=14, lora_alpha=8)


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, NUM, (8, 5), generator=g), "labels": torch.randint(0, 3, (8,), generator=g)}


def _trained(steps=9):
    model = fastadalora.get_adalora_model(TinyLM(), AdaLoraConfig(target_modules=["emb", "proj"], **SCHED))
    assert isinstance(model.model.emb, AdaLoraEmbedding)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for step in range(steps):
        model(**_batch(step)).loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
    return model


def test_allocation_changes_the_embedding_rank():
    model = _trained(steps=14)
    pattern = model.rank_pattern
    kept = sum(pattern["emb.lora_E"])
    assert kept < SCHED["init_r"]
    assert sum(sum(v) for v in pattern.values()) == SCHED["target_r"] * 2  # the final budget
    e = model.model.emb.lora_E.detach().reshape(-1)
    assert not ((e != 0) & ~torch.tensor(pattern["emb.lora_E"])).any()  # pruned triplets have E = 0


def test_checkpoint_round_trip(tmp_path):
    model = _trained()
    assert model.rank_pattern is not None and not all(model.rank_pattern["emb.lora_E"])
    model.eval()
    batch = _batch(100)
    with torch.no_grad():
        expected = model(**batch).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path)
    assert any("Embedding" in str(w.message) and "PEFT" in str(w.message) for w in caught)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["rank_pattern"]["emb.lora_E"] == model.rank_pattern["emb.lora_E"]
    loaded = fastadalora.AdaLoraModel.from_pretrained(TinyLM(), tmp_path)
    assert loaded.model.emb.r == sum(model.rank_pattern["emb.lora_E"]) and loaded.model.emb.ranknum == 6.0
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-6, atol=1e-6)


def test_lora_export_loads_in_peft_lora(tmp_path):
    peft = pytest.importorskip("peft")
    model = _trained()
    model.eval()
    batch = _batch(100)
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_lora(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = peft.PeftModel.from_pretrained(TinyLM(), str(tmp_path))
    assert type(lora.base_model.model.emb).__name__ == "Embedding"
    with torch.no_grad():
        torch.testing.assert_close(lora(**batch).logits, expected, rtol=1e-5, atol=1e-6)
