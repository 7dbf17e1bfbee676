"""Test support shared by every test file: tiny models, batches, a training loop, one op counter.

Tiny transformers models are built from config (no downloads).  Every model has dropout 0 and
eager attention, so two copies given the same weights and inputs compute the same numbers.
Widths: hidden 32, 2 heads, intermediate 64, vocab 64.  Keep these signatures stable: several
test files use them.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HIDDEN = 32
VOCAB = 64
SEQ = 8
BATCH = 4


def _seeded(seed: int | None):
    if seed is not None:
        torch.manual_seed(seed)


def tiny_bert(num_layers: int = 2, num_labels: int = 2, hidden: int = HIDDEN, seed: int | None = 0,
              dtype: torch.dtype = torch.float32):
    """A ``BertForSequenceClassification``: hidden 32, 2 heads, intermediate 2·hidden, dropout 0."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=32, type_vocab_size=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
                     num_labels=num_labels, attn_implementation="eager")
    _seeded(seed)
    model = BertForSequenceClassification(cfg)
    return model.to(dtype).eval()


def _gpt2_config(num_layers: int, hidden: int, num_labels: int = 2):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=num_layers, n_head=2, n_positions=32,
                      n_inner=2 * hidden, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                      num_labels=num_labels, pad_token_id=0, attn_implementation="eager")


def tiny_gpt2_cls(num_layers: int = 2, num_labels: int = 2, hidden: int = HIDDEN, seed: int | None = 0,
                  dtype: torch.dtype = torch.float32):
    """A ``GPT2ForSequenceClassification`` (Conv1D projections: fan_in_fan_out), pad token 0."""
    from transformers import GPT2ForSequenceClassification

    _seeded(seed)
    model = GPT2ForSequenceClassification(_gpt2_config(num_layers, hidden, num_labels))
    return model.to(dtype).eval()


def tiny_gpt2_lm(num_layers: int = 2, hidden: int = HIDDEN, seed: int | None = 0, dtype: torch.dtype = torch.float32):
    """A ``GPT2LMHeadModel`` (tied input/output embeddings)."""
    from transformers import GPT2LMHeadModel

    _seeded(seed)
    model = GPT2LMHeadModel(_gpt2_config(num_layers, hidden))
    return model.to(dtype).eval()


def cls_batch(batch: int = BATCH, seq: int = SEQ, num_labels: int = 2, seed: int = 0) -> dict:
    """``input_ids`` in [1, VOCAB) (0 is GPT-2's pad), a full ``attention_mask`` and integer ``labels``."""
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1, VOCAB, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, num_labels, (batch,), generator=g),
    }


def lm_batch(batch: int = BATCH, seq: int = SEQ, seed: int = 0) -> dict:
    """``input_ids`` with ``labels = input_ids`` for a causal LM loss."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long), "labels": ids.clone()}


def batches(n: int, kind: str = "cls", seed: int = 0, **kwargs) -> list[dict]:
    """``n`` different batches (seeds ``seed``, ``seed+1``, ...)."""
    make = cls_batch if kind == "cls" else lm_batch
    return [make(seed=seed + i, **kwargs) for i in range(n)]


# --------------------------------------------------------------------------- one layer, forward + backward
def adapter_grads(layer) -> list:
    """``[dA, dE, dB]`` of our adapter layer or of PEFT's (whose factors are per-adapter dicts)."""
    out = []
    for name in ("lora_A", "lora_E", "lora_B"):
        p = getattr(layer, name)
        out.append((p["default"] if isinstance(p, torch.nn.ParameterDict) else p).grad)
    return out


def forward_backward(layer, x, g, seed=None) -> list:
    """``[y, dx, dA, dE, dB]`` of ``layer(x).backward(g)`` on a fresh leaf copy of ``x`` (``seed``: the
    torch seed just before the forward, for dropout draws)."""
    x = x.detach().clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    y = layer(x)
    y.backward(g.to(y.dtype))
    return [y.detach(), x.grad, *adapter_grads(layer)]


class RowsDataset(torch.utils.data.Dataset):
    """A list of ready examples (dicts of tensors) as a ``Dataset``, for ``transformers.Trainer``."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


# --------------------------------------------------------------------------- training loop
def train(model, batch_list, allocate=None, lr: float = 0.05, optimizer: str = "adamw", start: int = 0):
    """A plain loop: forward (``.loss``), backward, step, ``allocate(step)``, ``zero_grad``; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr) if optimizer == "adamw" else torch.optim.SGD(params, lr=lr)
    losses = []
    model.train()
    for step, batch in enumerate(batch_list, start=start):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        if allocate is not None:
            allocate(step)
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


# --------------------------------------------------------------------------- op counter
class OpCounter(TorchDispatchMode):
    """``with OpCounter() as c: ...`` leaves the names of the dispatched non-view aten ops in ``c.ops``."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))
