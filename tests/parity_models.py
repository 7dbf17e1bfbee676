"""Tiny transformers models for the PEFT parity tests, built from configs (no downloads), as PEFT's suite does.

Each builder returns a fresh model in eval mode from a fixed seed.  ``PARITY_MODELS`` names them with
the facts the targeting grid needs: a target list, the name of the layer ``nn.ModuleList``
(``layers_pattern``) and one module path to exclude.
"""

from __future__ import annotations

import torch

from support import tiny_bert, tiny_gpt2_cls, tiny_gpt2_lm

HIDDEN = 32
VOCAB = 64


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                   num_heads=2, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(cfg).eval()


def tiny_bart(seed: int = 0):
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
                     dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
                     eos_token_id=2, decoder_start_token_id=2)
    torch.manual_seed(seed)
    return BartForConditionalGeneration(cfg).eval()


def _llama_config(**kwargs):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0,
                       attn_implementation="eager", **kwargs)


def tiny_llama(seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(_llama_config()).eval()


def tiny_llama_cls(seed: int = 0):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(_llama_config(num_labels=3)).eval()


def tiny_bert4(seed: int = 0):
    """A 4-layer BERT: 25 linear layers, past PEFT's 20-name threshold for minimising target lists."""
    return tiny_bert(num_layers=4, seed=seed)


PARITY_MODELS = {
    "bert": dict(build=tiny_bert, targets=["query", "value", "dense"], pattern="layer",
                 exclude="bert.encoder.layer.0.attention.self.query"),
    "bert4": dict(build=tiny_bert4, targets=["query", "key", "dense"], pattern="layer",
                  exclude="bert.pooler.dense"),
    "gpt2": dict(build=tiny_gpt2_lm, targets=["c_attn", "c_proj"], pattern="h", exclude="transformer.h.1.attn.c_proj"),
    "gpt2_cls": dict(build=tiny_gpt2_cls, targets=["c_attn", "c_fc"], pattern="h", exclude="transformer.h.0.mlp.c_fc"),
    "t5": dict(build=tiny_t5, targets=["q", "v", "wi", "wo"], pattern="block",
               exclude="decoder.block.1.layer.1.EncDecAttention.q"),
    "bart": dict(build=tiny_bart, targets=["q_proj", "v_proj", "fc1"], pattern="layers",
                 exclude="model.decoder.layers.0.encoder_attn.q_proj"),
    "llama": dict(build=tiny_llama, targets=["q_proj", "v_proj", "down_proj"], pattern="layers",
                  exclude="model.layers.1.mlp.down_proj"),
    "llama_cls": dict(build=tiny_llama_cls, targets=["q_proj", "o_proj", "up_proj"], pattern="layers",
                      exclude="model.layers.0.self_attn.o_proj"),
}
