"""Tiny models for tests: Hugging Face transformers models built from small configs with
random weights (no downloads), in eval mode, without KV caches, so torch.export captures them.

Every builder returns ``(model, example_kwargs)``; the matching ``*_inputs(batch, seq)``
makes fresh random inputs of another shape (``seq`` is the token count; for ViT it is
the image side in pixels, see :func:`vit_inputs`). Outputs are
transformers ``ModelOutput``s (pytree-registered, so torch.export handles them); ``out[0]``
is the main tensor. ``TINY_MODELS`` maps a name to ``(builder, inputs,
length_can_change)`` for ``pytest.mark.parametrize``; ViT's position embeddings fix its
length, so only its batch may change after capture.
"""
from __future__ import annotations

import torch
from transformers import (BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaForCausalLM,
                          ViTConfig, ViTModel)

VOCAB = 128


def _token_ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq))


def _padding_mask(batch: int, seq: int) -> torch.Tensor:
    """1 = token, 0 = padding: row b ends in 3b padded positions (row 0 has none)."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        mask[row, seq - min(3 * row, seq - 1):] = 0
    return mask


def llama_inputs(batch: int = 2, seq: int = 24) -> dict:
    return {"input_ids": _token_ids(batch, seq)}


def build_llama_gqa(batch: int = 2, seq: int = 24, attn_implementation: str = "sdpa", seed: int = 0):
    """Causal Llama, 4 query heads sharing 2 key/value heads (GQA), head_dim 16."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         use_cache=False, attn_implementation=attn_implementation)
    return LlamaForCausalLM(config).eval(), llama_inputs(batch, seq)


def build_llama_eager(batch: int = 2, seq: int = 24, seed: int = 0):
    return build_llama_gqa(batch, seq, attn_implementation="eager", seed=seed)


def bert_inputs(batch: int = 2, seq: int = 20) -> dict:
    return {"input_ids": _token_ids(batch, seq), "attention_mask": _padding_mask(batch, seq)}


def build_bert(batch: int = 2, seq: int = 20, attn_implementation: str = "sdpa", seed: int = 0):
    """Bidirectional BERT with a padding attention_mask, 4 heads of 8."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, use_cache=False,
                        attn_implementation=attn_implementation)
    return BertModel(config, add_pooling_layer=False).eval(), bert_inputs(batch, seq)


def build_bert_eager(batch: int = 2, seq: int = 20, seed: int = 0):
    return build_bert(batch, seq, attn_implementation="eager", seed=seed)


def gpt2_inputs(batch: int = 2, seq: int = 20) -> dict:
    return {"input_ids": _token_ids(batch, seq)}


def build_gpt2(batch: int = 2, seq: int = 20, attn_implementation: str = "sdpa", seed: int = 0):
    """Causal GPT-2, 4 heads of 8."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=1, eos_token_id=2, use_cache=False,
                        attn_implementation=attn_implementation)
    return GPT2Model(config).eval(), gpt2_inputs(batch, seq)


def build_gpt2_eager(batch: int = 2, seq: int = 20, seed: int = 0):
    return build_gpt2(batch, seq, attn_implementation="eager", seed=seed)


VIT_PATCH = 4


def vit_inputs(batch: int = 2, seq: int = 16) -> dict:
    """``seq`` is the image side in pixels: (seq / 4)^2 patches + CLS tokens (16 -> 17)."""
    return {"pixel_values": torch.randn(batch, 3, seq, seq)}


def build_vit(batch: int = 2, seq: int = 16, attn_implementation: str = "sdpa", seed: int = 0):
    """ViT on 16x16 images with 4x4 patches (17 tokens), 4 heads of 8. Its position
    embeddings fix the image size, so only the batch dimension can vary."""
    torch.manual_seed(seed)
    config = ViTConfig(image_size=16, patch_size=VIT_PATCH, num_channels=3, hidden_size=32,
                       intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       attn_implementation=attn_implementation)
    return ViTModel(config, add_pooling_layer=False).eval(), vit_inputs(batch, seq)


# name -> (builder, inputs, whether the sequence length can change after capture)
TINY_MODELS = {
    "llama_gqa": (build_llama_gqa, llama_inputs, True),
    "llama_gqa_eager": (build_llama_eager, llama_inputs, True),
    "bert_sdpa": (build_bert, bert_inputs, True),
    "bert_eager": (build_bert_eager, bert_inputs, True),
    "gpt2": (build_gpt2, gpt2_inputs, True),
    "gpt2_eager": (build_gpt2_eager, gpt2_inputs, True),
    "vit": (build_vit, vit_inputs, False),
}
