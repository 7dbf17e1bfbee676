"""The benchmark cases: fastadalora vs PEFT 0.21 AdaLoRA (and PEFT LoRA at r = init_r).

Each ``*_case`` builds both sides from identical weights and inputs, times them interleaved
(``harness.interleaved``) and returns rows (dicts) for the summary table and the CSV.  The
``setup_*`` builders are shared with the pytest-benchmark files (``bench/test_*.py``).

Cases:

* ``layer_case``      one linear layer: forward, backward, full; plus the bare frozen ``nn.Linear``,
                      so "adapter overhead" = time(adapted) − time(bare) can be compared;
* ``memory_case``     bytes saved for backward (``saved_tensors_hooks``; parameters and the input excluded);
* ``allocator_case``  ``update_and_allocate`` on a masking step, on a deep BERT-style model;
* ``orth_case``       orthogonal regularisation forward+backward on the same model;
* ``train_step_case`` forward, backward, AdamW step, ``update_and_allocate`` of a whole model.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

from fastadalora.peft_twin import LORA, copy_adapters_into_peft, copy_layer_into_peft

from . import layer_kinds
from .harness import interleaved, ratio

LORA_ALPHA = 8


# ============================================================================ builders
class _Holder(nn.Module):
    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def _peft_adalora_config(init_r: int, target_modules, dropout: float = 0.0, total_step: int = 100_000, **kw):
    import peft

    return peft.AdaLoraConfig(init_r=init_r, target_r=max(1, init_r // 2), tinit=100, tfinal=200, deltaT=10,
                              total_step=total_step, lora_alpha=LORA_ALPHA, lora_dropout=dropout,
                              target_modules=target_modules, **kw)


def _fa_config(init_r: int, target_modules, dropout: float = 0.0, total_step: int = 100_000, **kw):
    import fastadalora

    return fastadalora.AdaLoraConfig(init_r=init_r, target_r=max(1, init_r // 2), tinit=100, tfinal=200, deltaT=10,
                                     total_step=total_step, lora_alpha=LORA_ALPHA, lora_dropout=dropout,
                                     target_modules=target_modules, **kw)


# masking steps of the configs above: tinit < 500 + 10k < total_step - tfinal and (500 + 10k) % deltaT == 0
MASK_STEP = 500


def masking_steps():
    """Increasing masking steps 500, 510, ... (each step is allocated once), far below T - tfinal."""
    step = MASK_STEP
    while True:
        yield step
        step += 10


def setup_layers(n: int, d_in: int, d_out: int, r: int, dtype: torch.dtype, device: torch.device,
                 dropout: float = 0.0, seed: int = 0, adapter_dtype: torch.dtype | None = None,
                 x_dtype: torch.dtype | None = None) -> dict:
    """Bare ``nn.Linear``, ``AdaLoraLinear``, PEFT ``SVDLinear`` and PEFT LoRA ``Linear`` on one weight.

    The base is ``dtype``; the adapters are ``adapter_dtype`` (default: the base's) on both sides
    (PEFT's ``autocast_adapter_dtype`` makes them fp32 on a half base).  ``x_dtype`` is the input's
    (default: the base's; e.g. bf16 inputs to an fp32 base under autocast).  E is set to non-zero
    values (as after some training) and copied into PEFT's layer, so both compute the same numbers.
    Returns ``{"bare", "ours", "peft_adalora", "peft_lora", "x", "gy"}``.
    """
    import peft

    from fastadalora import AdaLoraLinear

    torch.manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype
    base = nn.Linear(d_in, d_out).to(device=device, dtype=dtype).requires_grad_(False)
    ours = AdaLoraLinear(copy.deepcopy(base), r=r, lora_alpha=LORA_ALPHA, lora_dropout=dropout,
                         adapter_dtype=adapter_dtype)
    with torch.no_grad():
        ours.lora_E.normal_()

    widen = adapter_dtype != dtype  # PEFT's autocast_adapter_dtype=True: fp32 adapters on a half base
    pa = peft.get_peft_model(_Holder(copy.deepcopy(base)), _peft_adalora_config(r, ["lin"], dropout),
                             autocast_adapter_dtype=widen)
    svd = pa.base_model.model.lin
    copy_layer_into_peft(ours, svd)

    pl = peft.get_peft_model(_Holder(copy.deepcopy(base)),
                             peft.LoraConfig(r=r, lora_alpha=LORA_ALPHA, lora_dropout=dropout, target_modules=["lin"]),
                             autocast_adapter_dtype=widen)
    lora = pl.base_model.model.lin
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_(std=0.02)  # non-zero B: the same work as a trained adapter

    x = torch.randn(n, d_in, device=device, dtype=x_dtype or dtype, requires_grad=True)
    gy = torch.randn(n, d_out, device=device, dtype=x_dtype or dtype)
    layers = {"bare": base, "ours": ours, "peft_adalora": svd, "peft_lora": lora}
    for m in layers.values():
        m.train()
    return {**layers, "x": x, "gy": gy}


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def layer_callables(s: dict, mode: str, autocast: torch.dtype | None = None) -> dict:
    """No-argument callables per contender for ``mode`` in ``forward|backward|full`` (under
    ``torch.autocast(dtype=autocast)`` when given)."""
    x, gy = s["x"], s["gy"]
    fns = {}
    for name in ("bare", "ours", "peft_adalora", "peft_lora"):
        layer = s[name]
        if mode == "forward":
            def fwd(layer=layer):
                with _autocast(x.device, autocast):
                    return layer(x)
            fns[name] = fwd
        elif mode == "full":
            def full(layer=layer):
                x.grad = None
                with _autocast(x.device, autocast):
                    y = layer(x)
                y.backward(gy.to(y.dtype))
            fns[name] = full
        elif mode == "backward":
            with _autocast(x.device, autocast):
                y = layer(x)

            def bwd(y=y):
                x.grad = None
                y.backward(gy.to(y.dtype), retain_graph=True)
            fns[name] = bwd
        else:
            raise ValueError(f"unknown mode {mode!r}")
    return fns


def setup_deep_models(num_layers: int, hidden: int, init_r: int, device: torch.device, seed: int = 0,
                      orth_reg_weight: float = 0.5) -> dict:
    """A BERT-style encoder (6 targets per layer), wrapped by fastadalora and by PEFT AdaLoRA.

    Adapter weights are copied across and E set non-zero.  The gradients come from one real
    forward/backward of our model, as in training (a squared-activation loss, plus
    ``orth_reg_weight · R``), and are copied into PEFT's parameters, so ``update_and_allocate`` and
    the orthogonal term see identical inputs on both sides.
    """
    import peft
    from transformers import BertConfig, BertModel

    import fastadalora

    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    cfg = BertConfig(vocab_size=128, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=4,
                     intermediate_size=4 * hidden, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    base = BertModel(cfg, add_pooling_layer=False).to(device)
    twin_base = copy.deepcopy(base)
    ours = fastadalora.get_adalora_model(base, _fa_config(init_r, targets))
    theirs = peft.get_peft_model(twin_base, _peft_adalora_config(init_r, targets))
    inner = theirs.base_model.model
    with torch.no_grad():
        for layer in ours.adapter_layers().values():
            layer.lora_E.normal_()
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (4, 32), generator=g).to(device)
    loss = ours(input_ids=ids).last_hidden_state.square().mean()
    if orth_reg_weight > 0:
        loss = loss + orth_reg_weight * ours.orth_reg_loss()
    loss.backward()
    copy_adapters_into_peft(ours, theirs)
    for path, layer in ours.adapter_layers().items():
        mod = inner.get_submodule(path)
        for name, p_ours in zip(LORA, layer.adapter_params()):
            getattr(mod, name)["default"].grad = p_ours.grad.clone()
    return {"ours": ours, "peft_adalora": theirs, "num_adapters": len(ours.adapter_layers())}


def peft_orth_reg(peft_model, adapter_name: str = "default") -> torch.Tensor:
    """PEFT 0.21's orthogonal term, the loop of ``AdaLoraModel.forward`` copied verbatim (PEFT has no
    stand-alone function for it)."""
    regu_loss, num_param = 0, 0
    for n, p in peft_model.base_model.model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and adapter_name in n:
            para_cov = p @ p.T if "lora_A" in n else p.T @ p
            eye = torch.eye(*para_cov.size(), out=torch.empty_like(para_cov))
            eye.requires_grad = False
            num_param += 1
            regu_loss += torch.norm(para_cov - eye, p="fro")
    return regu_loss / num_param


def setup_train_models(kind: str, num_layers: int, hidden: int, init_r: int, batch: int, seq: int,
                       device: torch.device, seed: int = 0, autocast: torch.dtype | None = None,
                       quantize: str | None = None) -> dict:
    """A BERT-style classifier (``kind="bert"``) or a GPT-2-style LM (``kind="gpt2"``), three ways:
    fastadalora, PEFT AdaLoRA and PEFT LoRA (r = init_r), each with its own AdamW.  ``quantize="nf4"``
    (BERT): every targeted linear becomes a bitsandbytes ``Linear4bit`` (bf16 compute), as in QLoRA.

    Returns ``{name: step_callable}`` plus ``"batch"``; each callable runs one full training step.
    """
    import peft

    import fastadalora

    torch.manual_seed(seed)
    vocab = 512
    if kind == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=4,
                         intermediate_size=4 * hidden, max_position_embeddings=max(64, seq), hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, num_labels=2, attn_implementation="eager")
        base = BertForSequenceClassification(cfg)
        targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
        heads, task = ["classifier"], "SEQ_CLS"
        labels = torch.randint(0, 2, (batch,))
    elif kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=num_layers, n_head=4, n_positions=max(64, seq),
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                         loss_type="ForCausalLM", attn_implementation="eager")
        base = GPT2LMHeadModel(cfg)
        targets = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
        heads, task = None, "CAUSAL_LM"
        labels = None
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    base = base.to(device)
    if quantize:
        if kind != "bert":
            raise ValueError("quantize: the BERT-style model only")
        from .layer_kinds import linear4bit_from

        for name, mod in list(base.named_modules()):
            if isinstance(mod, torch.nn.Linear) and any(name.endswith(t) for t in targets):
                parent, _, child = name.rpartition(".")
                setattr(base.get_submodule(parent), child, linear4bit_from(mod, quantize, torch.bfloat16, device))
        base.is_loaded_in_4bit = True
    ids = torch.randint(1, vocab, (batch, seq))
    batch_d = {"input_ids": ids.to(device), "labels": (ids if labels is None else labels).to(device)}

    b_peft, b_lora = copy.deepcopy(base), copy.deepcopy(base)
    fifo = kind == "gpt2"  # GPT-2's Conv1D stores its weight (in, out)
    ours = fastadalora.get_adalora_model(base, _fa_config(init_r, targets, modules_to_save=heads,
                                                          fan_in_fan_out=fifo))
    pa = peft.get_peft_model(b_peft, _peft_adalora_config(init_r, targets, modules_to_save=heads, task_type=task,
                                                          fan_in_fan_out=fifo))
    with torch.no_grad():
        for layer in ours.adapter_layers().values():
            layer.lora_E.normal_()
    copy_adapters_into_peft(ours, pa)
    pl = peft.get_peft_model(b_lora, peft.LoraConfig(r=init_r, lora_alpha=LORA_ALPHA, target_modules=targets,
                                                     modules_to_save=heads, task_type=task,
                                                     fan_in_fan_out=fifo))
    models = {"ours": ours, "peft_adalora": pa, "peft_lora": pl}
    steps = {}
    for name, m in models.items():
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        allocate = (m.update_and_allocate if name == "ours" else
                    m.base_model.update_and_allocate if name == "peft_adalora" else None)

        def step(m=m, opt=opt, allocate=allocate, steps=masking_steps()):
            with _autocast(device, autocast):
                loss = m(**batch_d).loss
            loss.backward()
            opt.step()
            if allocate is not None:
                allocate(next(steps))
            opt.zero_grad(set_to_none=True)
        steps[name] = step
    return {**steps, "models": models, "batch": batch_d}


# ============================================================================ cases
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def layer_case(n: int, d_in: int, d_out: int, r: int, dtype: torch.dtype, modes, device: torch.device,
               repeats: int = 10, warmup: int = 2, adapter_dtype: torch.dtype | None = None,
               autocast: torch.dtype | None = None) -> list[dict]:
    """One layer, fwd/bwd/full; ``adapter_dtype`` fp32 on a half base, or the whole comparison under
    ``torch.autocast(dtype=autocast)`` (an fp32 base fed ``autocast``-dtype inputs, as in a model)."""
    s = setup_layers(n, d_in, d_out, r, dtype, device, adapter_dtype=adapter_dtype, x_dtype=autocast)
    label = _dtype_name(dtype) + (f", {_dtype_name(adapter_dtype)} adapters" if adapter_dtype not in (None, dtype)
                                  else "") + (f", autocast {_dtype_name(autocast)}" if autocast else "")
    rows = []
    for mode in modes:
        t = interleaved(layer_callables(s, mode, autocast), device, repeats=repeats, warmup=warmup)
        over_ours, over_peft = t["ours"] - t["bare"], t["peft_adalora"] - t["bare"]
        over_lora = t["peft_lora"] - t["bare"]
        rows.append({
            "case": "layer", "mode": mode, "shape": f"N={n} {d_in}->{d_out} r={r}", "dtype": label,
            "device": device.type, "unit": "s", "ours": t["ours"], "peft_adalora": t["peft_adalora"],
            "peft_lora": t["peft_lora"], "bare": t["bare"],
            "ratio_vs_adalora": ratio(t["ours"], t["peft_adalora"]), "ratio_vs_lora": ratio(t["ours"], t["peft_lora"]),
            "overhead_ours": over_ours, "overhead_peft": over_peft, "overhead_lora": over_lora,
            # a negative or zero PEFT overhead (noise on tiny shapes) gives NaN, never a crash
            "overhead_ratio": ratio(over_ours, over_peft) if over_peft > 0 else float("nan"),
        })
    return rows


def saved_bytes(fn, exclude: list[torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves while ``fn()`` runs, excluding ``exclude`` (by storage)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: set[tuple] = set()
    total = 0

    def pack(t):
        nonlocal total
        if isinstance(t, torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            key = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if ptr not in skip and key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total


def memory_case(n: int, d_in: int, d_out: int, r: int, dtype: torch.dtype, device: torch.device,
                dropout: float, autocast: torch.dtype | None = None) -> list[dict]:
    s = setup_layers(n, d_in, d_out, r, dtype, device, dropout=dropout, x_dtype=autocast)
    x = s["x"]
    res = {}
    for name in ("bare", "ours", "peft_adalora", "peft_lora"):
        layer = s[name]
        params = list(layer.parameters()) + list(layer.buffers())

        def forward(layer=layer):
            with _autocast(device, autocast):
                return layer(x)
        res[name] = saved_bytes(forward, params + [x])
    return [{
        "case": "saved_activations", "mode": f"dropout={dropout}", "shape": f"N={n} {d_in}->{d_out} r={r}",
        "dtype": _dtype_name(dtype) + (f", autocast {_dtype_name(autocast)}" if autocast else ""),
        "device": device.type, "unit": "bytes", "ours": res["ours"],
        "peft_adalora": res["peft_adalora"], "peft_lora": res["peft_lora"], "bare": res["bare"],
        "ratio_vs_adalora": ratio(res["ours"], res["peft_adalora"]), "ratio_vs_lora": ratio(res["ours"], res["peft_lora"]),
    }]


def allocator_case(num_layers: int, hidden: int, init_r: int, device: torch.device, repeats: int = 10,
                   warmup: int = 2) -> list[dict]:
    """Two rows: gradients from a loss with the orthogonal term (PEFT's default 0.5) and without it.
    Both sides read the same separate Parameters and ``.grad``s; ours gathers them into chunk
    buffers (one ``cat`` per shape group), PEFT loops over them."""
    rows = []
    for orth in (0.5, 0.0):
        s = setup_deep_models(num_layers, hidden, init_r, device, orth_reg_weight=orth)
        ours, theirs = s["ours"], s["peft_adalora"]
        ours_steps, peft_steps = masking_steps(), masking_steps()
        fns = {"ours": lambda: ours.update_and_allocate(next(ours_steps)),
               "peft_adalora": lambda: theirs.base_model.update_and_allocate(next(peft_steps))}
        t = interleaved(fns, device, repeats=repeats, warmup=warmup)
        rows.append({
            "case": "update_and_allocate", "mode": f"masking step, orth_reg_weight={orth}",
            "shape": f"{num_layers}x6={s['num_adapters']} adapters, width {hidden}, init_r={init_r}",
            "dtype": "float32", "device": device.type, "unit": "s", "ours": t["ours"],
            "peft_adalora": t["peft_adalora"], "ratio_vs_adalora": ratio(t["ours"], t["peft_adalora"]),
        })
    return rows


def orth_case(num_layers: int, hidden: int, init_r: int, device: torch.device, repeats: int = 10,
              warmup: int = 2) -> list[dict]:
    s = setup_deep_models(num_layers, hidden, init_r, device)
    ours, theirs = s["ours"], s["peft_adalora"]

    # As in a training step after zero_grad(set_to_none=True): the term's gradients start from None.
    ours_params = [p for p in ours.parameters() if p.requires_grad]
    peft_params = [p for p in theirs.parameters() if p.requires_grad]

    def run_ours():
        for p in ours_params:
            p.grad = None
        ours.orth_reg_loss().backward()

    def run_peft():
        for p in peft_params:
            p.grad = None
        peft_orth_reg(theirs).backward()

    t = interleaved({"ours": run_ours, "peft_adalora": run_peft}, device, repeats=repeats, warmup=warmup)
    with torch.no_grad():
        agree = abs(float(ours.orth_reg_loss()) - float(peft_orth_reg(theirs)))
    return [{
        "case": "orth_reg", "mode": "forward+backward",
        "shape": f"{num_layers}x6={s['num_adapters']} adapters, width {hidden}, init_r={init_r}",
        "dtype": "float32", "device": device.type, "unit": "s", "ours": t["ours"], "peft_adalora": t["peft_adalora"],
        "ratio_vs_adalora": ratio(t["ours"], t["peft_adalora"]), "note": f"|R_ours - R_peft| = {agree:.1e}",
    }]


def train_step_case(kind: str, num_layers: int, hidden: int, init_r: int, batch: int, seq: int,
                    device: torch.device, repeats: int = 6, warmup: int = 1,
                    autocast: torch.dtype | None = None, quantize: str | None = None) -> list[dict]:
    s = setup_train_models(kind, num_layers, hidden, init_r, batch, seq, device, autocast=autocast, quantize=quantize)
    t = interleaved({k: s[k] for k in ("ours", "peft_adalora", "peft_lora")}, device, repeats=repeats, warmup=warmup)
    return [{
        "case": "train_step", "mode": f"{kind}: fwd+bwd+AdamW+allocate" + (f", autocast {_dtype_name(autocast)}"
                                                                          if autocast else "")
        + (f", {quantize} base" if quantize else ""),
        "shape": f"{num_layers} layers, hidden {hidden}, batch {batch}x{seq}, init_r={init_r}",
        "dtype": "float32", "device": device.type, "unit": "s", "ours": t["ours"], "peft_adalora": t["peft_adalora"],
        "peft_lora": t["peft_lora"], "ratio_vs_adalora": ratio(t["ours"], t["peft_adalora"]),
        "ratio_vs_lora": ratio(t["ours"], t["peft_lora"]),
    }]


def _state_bytes(model, opt) -> int:
    """Adapter parameters + their optimizer state + the allocator's state, in bytes."""
    params = [p for layer in model.adapter_layers().values() for p in layer.adapter_params()]
    total = sum(p.numel() * p.element_size() for p in params)
    for p in params:
        total += sum(v.numel() * v.element_size() for v in opt.state.get(p, {}).values() if torch.is_tensor(v))
    alloc = model.allocator
    bufs = [alloc._ipt, alloc._unc, *(alloc._spare or ()), *(alloc._scratch_bufs or ()), *(alloc._chunk_bufs or ())]
    return total + sum(b.numel() * b.element_size() for b in bufs if torch.is_tensor(b))


def compaction_case(init_r: int, target_r: int, device: torch.device, num_layers: int = 4, hidden: int = 256,
                    batch: int = 8, seq: int = 128, repeats: int = 6, warmup: int = 1) -> list[dict]:
    """The training step and the adapter+optimizer+allocator memory after ``compact_ranks`` against the
    same model masked (both fastadalora; PEFT only masks), in the final fixed-pattern phase."""
    import fastadalora
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=512, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=4,
                     intermediate_size=4 * hidden, max_position_embeddings=max(64, seq), hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=2, attn_implementation="eager")
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    switch = 8
    model = fastadalora.get_adalora_model(BertForSequenceClassification(cfg).to(device), fastadalora.AdaLoraConfig(
        init_r=init_r, target_r=target_r, tinit=2, tfinal=100_000 - switch, deltaT=1, total_step=100_000,
        lora_alpha=LORA_ALPHA, target_modules=targets, modules_to_save=["classifier"]))
    ids = torch.randint(1, 512, (batch, seq), device=device)
    batch_d = {"input_ids": ids, "labels": torch.randint(0, 2, (batch,), device=device)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for step in range(switch + 1):  # into the final phase: the pattern is fixed
        model(**batch_d).loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
    compact = copy.deepcopy(model)
    opt_c = torch.optim.AdamW([p for p in compact.parameters() if p.requires_grad], lr=1e-4)
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    compact.compact_ranks(opt_c)

    def stepper(m, o):
        counter = iter(range(switch + 1, 100_000))

        def step():
            m(**batch_d).loss.backward()
            o.step()
            m.update_and_allocate(next(counter))
            o.zero_grad(set_to_none=True)
        return step

    t = interleaved({"compact": stepper(compact, opt_c), "masked": stepper(model, opt)}, device, repeats=repeats,
                    warmup=warmup)
    shape = f"{num_layers} layers, hidden {hidden}, batch {batch}x{seq}, init_r={init_r}->target_r={target_r}"
    mem_c, mem_m = _state_bytes(compact, opt_c), _state_bytes(model, opt)
    note = "both fastadalora: the 'ours' column is compacted, the 'PEFT AdaLoRA' column masked (what PEFT does)"
    return [
        {"case": "compaction", "mode": "train step, compacted vs masked", "shape": shape, "dtype": "float32",
         "device": device.type, "unit": "s", "ours": t["compact"], "peft_adalora": t["masked"],
         "ratio_vs_adalora": ratio(t["compact"], t["masked"]), "note": note},
        {"case": "compaction", "mode": "adapter+optimizer+allocator bytes", "shape": shape, "dtype": "float32",
         "device": device.type, "unit": "bytes", "ours": mem_c, "peft_adalora": mem_m,
         "ratio_vs_adalora": ratio(mem_c, mem_m), "note": note},
    ]


# ============================================================================ plans
def plan(device: torch.device, quick: bool = False) -> list[tuple[str, dict]]:
    """The list of ``(case function name, kwargs)`` to run: tiny with ``quick``, a representative
    subset on CPU (the full summary stays within minutes), the full grid on CUDA."""
    f32, bf16 = torch.float32, torch.bfloat16
    modes = ("forward", "backward", "full")
    if quick:
        return [
            ("layer_case", dict(n=64, d_in=32, d_out=48, r=4, dtype=f32, modes=modes, repeats=3, warmup=1)),
            ("memory_case", dict(n=64, d_in=32, d_out=48, r=4, dtype=f32, dropout=0.0)),
            ("memory_case", dict(n=64, d_in=32, d_out=48, r=4, dtype=f32, dropout=0.1)),
            ("allocator_case", dict(num_layers=2, hidden=32, init_r=4, repeats=3, warmup=1)),
            ("orth_case", dict(num_layers=2, hidden=32, init_r=4, repeats=3, warmup=1)),
            ("train_step_case", dict(kind="bert", num_layers=1, hidden=32, init_r=4, batch=2, seq=8, repeats=2)),
            ("train_step_case", dict(kind="gpt2", num_layers=1, hidden=32, init_r=4, batch=2, seq=8, repeats=2)),
            ("train_step_case", dict(kind="bert", num_layers=1, hidden=32, init_r=4, batch=2, seq=8, repeats=2,
                                     quantize="nf4")),
            ("layer_case", dict(n=64, d_in=32, d_out=48, r=4, dtype=f32, modes=("full",), repeats=2, warmup=1,
                                autocast=bf16)),
            ("compaction_case", dict(init_r=4, target_r=2, num_layers=1, hidden=32, batch=2, seq=8, repeats=2)),
            *layer_kinds.plan(device, quick=True),
        ]
    cases: list[tuple[str, dict]] = []
    if device.type == "cuda":
        for d in (768, 1024, 4096):
            for n in (512, 2048, 8192):
                for r in ((8, 12, 64) if d == 1024 else (12,)):
                    for dtype in (f32, bf16) if torch.cuda.is_bf16_supported() else (f32,):
                        cases.append(("layer_case", dict(n=n, d_in=d, d_out=d, r=r, dtype=dtype, modes=modes,
                                                         repeats=30, warmup=5)))
        cases.append(("layer_case", dict(n=4096, d_in=1024, d_out=1024, r=12, dtype=f32, modes=modes, repeats=50)))
        mem = dict(n=4096, d_in=1024, d_out=1024, r=12)
        cases += [("memory_case", dict(**mem, dtype=bf16 if torch.cuda.is_bf16_supported() else f32, dropout=p))
                  for p in (0.0, 0.1)]
        train = dict(num_layers=12, hidden=768, init_r=12, batch=8, seq=512, repeats=10, warmup=3)
    else:
        cases += [
            # the headline case first
            ("layer_case", dict(n=4096, d_in=1024, d_out=1024, r=12, dtype=f32, modes=modes, repeats=10)),
            ("layer_case", dict(n=2048, d_in=768, d_out=768, r=8, dtype=f32, modes=("full",), repeats=10)),
            ("layer_case", dict(n=8192, d_in=768, d_out=768, r=12, dtype=f32, modes=("full",), repeats=6)),
            ("layer_case", dict(n=512, d_in=4096, d_out=4096, r=64, dtype=f32, modes=("full",), repeats=6)),
            ("layer_case", dict(n=2048, d_in=1024, d_out=1024, r=12, dtype=bf16, modes=("full",), repeats=6)),
            # what users run: an fp32 model under bf16 autocast, and fp32 adapters on a bf16 base
            ("layer_case", dict(n=4096, d_in=1024, d_out=1024, r=12, dtype=f32, modes=("full",), repeats=8,
                                autocast=bf16)),
            ("layer_case", dict(n=4096, d_in=1024, d_out=1024, r=12, dtype=bf16, modes=("full",), repeats=8,
                                adapter_dtype=f32)),
        ]
        cases += [("memory_case", dict(n=4096, d_in=1024, d_out=1024, r=12, dtype=f32, dropout=p)) for p in (0.0, 0.1)]
        cases.append(("memory_case", dict(n=4096, d_in=1024, d_out=1024, r=12, dtype=f32, dropout=0.1, autocast=bf16)))
        train = dict(num_layers=4, hidden=256, init_r=12, batch=8, seq=128, repeats=8, warmup=2)
    cases += [
        ("allocator_case", dict(num_layers=24, hidden=256, init_r=12, repeats=40, warmup=5)),
        ("orth_case", dict(num_layers=24, hidden=256, init_r=12, repeats=40, warmup=5)),
        ("train_step_case", dict(kind="bert", **train)),
        ("train_step_case", dict(kind="gpt2", **train)),
        ("train_step_case", dict(kind="bert", **train, autocast=bf16)),
        ("train_step_case", dict(kind="bert", **train, quantize="nf4")),
        ("compaction_case", dict(init_r=12, target_r=4)),
        ("compaction_case", dict(init_r=64, target_r=16)),
    ]
    return cases + layer_kinds.plan(device)


def run_case(name: str, kwargs: dict, device: torch.device) -> list[dict]:
    if name in layer_kinds.CASES:
        return layer_kinds.CASES[name](device=device, **kwargs)
    fn = globals()[name]
    if name in ("layer_case", "memory_case", "allocator_case", "orth_case", "train_step_case", "compaction_case"):
        return fn(device=device, **kwargs)
    raise ValueError(f"unknown case {name!r}")


def finite_positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0
