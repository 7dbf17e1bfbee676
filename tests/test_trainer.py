"""``transformers.Trainer`` end to end: bf16 autocast with the orthogonal term, adapter-sized checkpoints
(PEFT format plus the allocator state, tied embeddings included), exact resume, total_step from max_steps."""

import os
import warnings

import pytest
import safetensors.torch
import torch

import fastadalora
from fastadalora import AdaLoraConfig
from support import RowsDataset, cls_batch, lm_batch, tiny_bert, tiny_gpt2_lm

transformers = pytest.importorskip("transformers")

STEPS = 20


def _rows(kind, n):
    batch = cls_batch(batch=n, seed=1) if kind == "bert" else lm_batch(batch=n, seed=1)
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _model(kind):
    if kind == "bert":
        base, targets, task = tiny_bert(seed=0), ["query", "key", "value", "dense"], "SEQ_CLS"
    else:
        base, targets, task = tiny_gpt2_lm(seed=0), ["c_attn", "c_proj", "c_fc"], "CAUSAL_LM"
    cfg = AdaLoraConfig(init_r=4, target_r=2, tinit=2, tfinal=4, deltaT=2, lora_alpha=8, target_modules=targets,
                        task_type=task, orth_reg_weight=0.5)  # total_step: left None, the callback fills it
    return fastadalora.get_adalora_model(base, cfg)


def _trainer(model, kind, out, eval_dataset=None, **overrides):
    args = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=0.02,
                report_to=[], use_cpu=True, bf16=True, save_strategy="steps", save_steps=10, logging_strategy="no",
                disable_tqdm=True, dataloader_num_workers=0, seed=7)
    args.update(overrides)
    return transformers.Trainer(model=model, args=transformers.TrainingArguments(**args),
                                train_dataset=RowsDataset(_rows(kind, 4 * STEPS)), eval_dataset=eval_dataset,
                                callbacks=[fastadalora.AdaLoraCallback()])


def _adapter_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k != "_extra_state"}


@pytest.fixture(scope="module", params=["bert", "gpt2"])
def straight_run(request, tmp_path_factory):
    kind = request.param
    out = tmp_path_factory.mktemp(f"straight-{kind}")
    model = _model(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(model, kind, out).train()
    return kind, out, model


def test_bf16_trainer_trains_with_the_orth_term_and_ranks_change(straight_run):
    kind, _, model = straight_run
    assert model.adalora_config.total_step == STEPS  # filled by the callback from max_steps
    pattern = model.rank_pattern
    assert pattern is not None
    kept = [sum(v) for v in pattern.values()]
    assert sum(kept) == 2 * len(pattern) and len(set(kept)) > 1  # target budget reached, ranks differ by layer
    assert all(lay.lora_A.dtype == torch.float32 for lay in model.adapter_layers().values())


def test_checkpoints_are_adapter_sized_and_peft_format(straight_run):
    kind, out, model = straight_run
    ckpt = out / "checkpoint-10"
    weights = ckpt / "model.safetensors"
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() * p.element_size() for p in model.model.parameters())
    extra = model.state_dict()["_extra_state"].numel()
    assert weights.stat().st_size <= trainable + extra + 64 * 1024, (weights.stat().st_size, trainable, extra)
    saved = safetensors.torch.load_file(weights)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not frozen & set(saved) and not any(k.endswith(".base_layer.weight") for k in saved)
    assert not any(k.endswith(("wte.weight", "lm_head.weight", "word_embeddings.weight")) for k in saved)
    assert sum(t.numel() * t.element_size() for k, t in saved.items() if k != "_extra_state") <= trainable < base
    # the PEFT-format adapter beside it loads in PEFT and in fastadalora
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "adapter_config.json").is_file()
    peft = pytest.importorskip("peft")
    base_model = tiny_bert(seed=0) if kind == "bert" else tiny_gpt2_lm(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.PeftModel.from_pretrained(base_model, str(ckpt))
    loaded = fastadalora.AdaLoraModel.from_pretrained(tiny_bert(seed=0) if kind == "bert" else tiny_gpt2_lm(seed=0),
                                                     ckpt)
    assert set(loaded.adapter_layers()) == set(model.adapter_layers())


def test_resume_from_checkpoint_is_bit_exact(straight_run, tmp_path):
    kind, out, model = straight_run
    resumed = _model(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(resumed, kind, tmp_path).train(resume_from_checkpoint=str(out / "checkpoint-10"))
    assert resumed.rank_pattern == model.rank_pattern
    a, b = _adapter_state(model), _adapter_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = model.allocator.state_dict(), resumed.allocator.state_dict()
    assert torch.equal(sa["ipt"], sb["ipt"]) and sa["last_step"] == sb["last_step"] == STEPS - 1


def test_callback_warns_when_the_ranks_never_changed(tmp_path):
    model = _model("bert")
    model.set_total_step(100)  # the schedule of a longer run than the Trainer's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(model, "bert", tmp_path, max_steps=2, save_strategy="no", bf16=False).train()
    messages = [str(w.message) for w in caught]
    assert any("total_step=100 but the Trainer runs max_steps=2" in m for m in messages)
    assert any("ranks never changed" in m for m in messages)  # 2 steps, tinit=2: no masking step was reached


def test_trainer_checkpoint_of_a_tied_model_saves(tmp_path):
    """GPT-2's tied lm_head/wte made safetensors refuse the whole-model state dict ("shared tensors")."""
    model = _model("gpt2")
    model.set_total_step(10)
    trainer = _trainer(model, "gpt2", tmp_path, max_steps=2, save_strategy="no")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert os.path.getsize(tmp_path / "final" / "model.safetensors") < 1_000_000


def test_evaluate_reports_the_eval_loss_and_best_model_loads(tmp_path):
    """Trainer reads label names from the class's forward (PEFT's models look through to the base class):
    without them it computes no ``eval_loss``, and ``metric_for_best_model="eval_loss"`` fails."""
    model = _model("bert")
    trainer = _trainer(model, "bert", tmp_path, eval_dataset=RowsDataset(_rows("bert", 8)), eval_strategy="steps",
                       eval_steps=10, load_best_model_at_end=True, metric_for_best_model="eval_loss", bf16=False)
    assert trainer.label_names == ["labels"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    metrics = trainer.evaluate()
    model.eval()
    batch = cls_batch(batch=8, seed=1)
    with torch.no_grad():
        want = float(model(**batch).loss)  # eval mode: the model's own loss, no orthogonal term
    assert metrics["eval_loss"] == pytest.approx(want, rel=1e-6)
    assert trainer.state.best_model_checkpoint is not None
