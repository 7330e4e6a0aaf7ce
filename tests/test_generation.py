"""``sparsec.attach``: sparse prefill inside Hugging Face ``generate()``.

Tiny random models of each family (2 layers, hidden 64): with a plan at its baseline
(dense, or the model's own window) greedy ``generate()`` is token-identical to the model;
with sparse heads the attached prefill equals the compiled forward, chunked prefill equals
one-shot prefill, and padding is honoured."""
from __future__ import annotations

import copy
import functools
import json
import warnings

import pytest
import torch
import transformers
from transformers import DynamicCache

import sparsec
from sparsec.patterns.base import baseline_pattern

# Compiling with tolerance=None measures and warns; the plans here are not meant to be accurate.
pytestmark = pytest.mark.filterwarnings("ignore:sparsec. the compiled model's measured")

VOCAB = 128
WINDOW = 8          # the sliding window of Mistral / Gemma 2 / Gemma 3, shorter than the prompts
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              max_position_embeddings=256)


def _config(family: str):
    if family == "llama":       # four KV heads: interleaved patterns make fuse_heads permute heads
        return transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **COMMON)
    if family == "qwen2":
        return transformers.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **COMMON)
    if family == "mistral":
        return transformers.MistralConfig(num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW,
                                          **COMMON)
    if family == "gemma2":      # eager attention (Gemma 2 has no SDPA), soft-capping off so sites match
        return transformers.Gemma2Config(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         sliding_window=WINDOW, attn_logit_softcapping=None,
                                         attn_implementation="eager", **COMMON)
    if family == "gemma3":
        return transformers.Gemma3TextConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                             sliding_window=WINDOW,
                                             layer_types=["sliding_attention", "full_attention"], **COMMON)
    if family == "phi3":
        return transformers.Phi3Config(num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, **COMMON)
    raise ValueError(family)


_MODEL_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                  "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}
FAMILIES = [name for name, cls in _MODEL_CLASSES.items() if hasattr(transformers, cls)]


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=generator)


@functools.lru_cache(maxsize=None)
def _compiled(family: str):
    """The family's model (eval, shared: every test detaches) and its compiled model."""
    torch.manual_seed(0)
    model = getattr(transformers, _MODEL_CLASSES[family])(_config(family)).eval()
    compiled = sparsec.compile(model, {"input_ids": _ids(2, 24, 1)}, tolerance=None)
    assert len(compiled.plan.attention) == 2
    return model, compiled


def _baseline_plan(plan: sparsec.Plan) -> sparsec.Plan:
    """Every head at its baseline: dense, or the model's own sliding window."""
    plan = copy.deepcopy(plan)
    for site in plan.attention:
        for head in site.heads:
            head.assign(*baseline_pattern(site), reason="test: baseline")
    plan.regroup()
    return plan


# Sinks and stripes reach past the keys a rolling cache of WINDOW drops, so they move.
PATTERNS = {"window": {"window": [5, 0]}, "sink_window": {"sink": [2, 0], "window": [4, 0]},
            "wide_sink_window": {"sink": [9, 0], "window": [3, 0]},
            "vertical_stripe": {"columns": list(range(1, 30, 3)), "window": [2, 0]},
            "block_topk": {"block": 4, "grid": [2, 2], "blocks": [[1, 0]]}}


def _sparse_plan(plan: sparsec.Plan, kinds=("window", "sink_window")) -> sparsec.Plan:
    """Heads 0 and 2 sparse (narrower than the model's window; ``kinds`` name PATTERNS), 1
    and 3 at baseline."""
    plan = _baseline_plan(plan)
    for site in plan.attention:
        for head, kind in zip((0, 2), kinds * 2):
            site.heads[head].assign(kind.removeprefix("wide_"), PATTERNS[kind], reason="test: sparse head")
    plan.regroup()
    return plan


@functools.lru_cache(maxsize=None)
def _compiled_sparse(family: str):
    model, compiled = _compiled(family)
    return sparsec.compile(model, {"input_ids": _ids(2, 24, 1)}, plan=_sparse_plan(compiled.plan), tolerance=None)


def _generate(model, ids, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_baseline_plan_generates_the_models_tokens(family):
    model, compiled = _compiled(family)
    prompt = _ids(1, 21, 2)
    expected = _generate(model, prompt)
    previous = model.config._attn_implementation
    with sparsec.attach(model, _baseline_plan(compiled.plan)) as attachment:
        assert model.config._attn_implementation == f"sparsec_{previous}"
        assert len(attachment.sites) == 2
        assert torch.equal(_generate(model, prompt), expected)
    assert model.config._attn_implementation == previous


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_prefill_equals_the_compiled_forward(family):
    model, _ = _compiled(family)
    compiled = _compiled_sparse(family)
    prompt = _ids(1, 30, 3)
    with torch.no_grad():
        expected = compiled(input_ids=prompt).logits
        dense = model(prompt).logits
        with sparsec.attach(model, compiled):
            logits = model(prompt).logits
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)
    assert (logits - dense).abs().max() > 1e-3                   # the sparse heads changed the output


def test_fused_head_order_is_undone_for_the_live_model():
    """Llama's interleaved sparse heads are permuted in the compiled weights; attach groups
    the model's own heads (the previous test compares the logits)."""
    site = _compiled_sparse("llama").plan.attention[0]
    assert site.head_permutation() != list(range(4))
    groups = sparsec.generation.model_order_groups(site)
    assert sorted((g.pattern, tuple(g.heads)) for g in groups) == [
        ("dense", (1, 3)), ("sink_window", (2,)), ("window", (0,))]


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_equals_one_shot(family):
    """Three pieces of 11, 9 and 10 queries. Sliding-window layers' caches (Mistral, Gemma)
    keep the last WINDOW - 1 keys: the second piece sees the keys from position 4, the third
    from 13, so the sinks and stripes at absolute key positions move."""
    model, compiled = _compiled(family)
    plan = _sparse_plan(compiled.plan, kinds=("wide_sink_window", "vertical_stripe"))
    prompt = _ids(1, 30, 4)
    with torch.no_grad(), sparsec.attach(model, plan):
        one_shot = model(prompt).logits
        cache = DynamicCache(config=model.config)
        pieces = [model(piece, cache=cache, use_cache=True).logits
                  for piece in (prompt[:, :11], prompt[:, 11:20], prompt[:, 20:])]
    torch.testing.assert_close(torch.cat(pieces, dim=1), one_shot, atol=2e-5, rtol=1e-4)


def test_rolled_block_grid_runs_the_baseline_and_warns_once():
    """After 13 keys Mistral's cache starts at position 6, halfway through a 4-key block:
    block_topk heads run the site's baseline there, with one warning per site."""
    model, compiled = _compiled("mistral")
    plan = _sparse_plan(compiled.plan, kinds=("block_topk",))
    prompt = _ids(1, 30, 10)
    with torch.no_grad(), sparsec.attach(model, plan), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = DynamicCache(config=model.config)
        for piece in (prompt[:, :13], prompt[:, 13:22], prompt[:, 22:]):
            model(piece, cache=cache, use_cache=True)
    rolled = [w for w in caught if "rolling sliding-window cache" in str(w.message)]
    assert sorted(str(w.message).split()[1] for w in rolled) == sorted(site.name for site in plan.attention)
    assert all("heads [0, 2] run window instead of block_topk" in str(w.message) for w in rolled)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])      # Mistral's cache rolls while decoding
def test_sparse_decode_keeps_bounded_patterns_and_equals_prefill(family):
    """decode="sparse": sink_window / vertical_stripe heads (a bounded number of keys per
    query) keep their pattern for single queries, so decoding token by token equals
    prefilling the whole sequence."""
    model, compiled = _compiled(family)
    plan = _sparse_plan(compiled.plan, kinds=("wide_sink_window", "vertical_stripe"))
    sequence = _ids(1, 26, 5)
    with torch.no_grad(), sparsec.attach(model, plan, decode="sparse"):
        one_shot = model(sequence).logits
        cache = DynamicCache(config=model.config)
        steps = [model(sequence[:, :20], cache=cache, use_cache=True).logits]
        steps += [model(sequence[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(20, 26)]
    torch.testing.assert_close(torch.cat(steps, dim=1), one_shot, atol=2e-5, rtol=1e-4)
    with torch.no_grad(), sparsec.attach(model, plan):                    # dense decode differs
        cache = DynamicCache(config=model.config)
        model(sequence[:, :25], cache=cache, use_cache=True)
        dense_step = model(sequence[:, 25:], cache=cache, use_cache=True).logits
    assert (dense_step[:, -1] - one_shot[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gemma2"])           # sdpa's boolean and eager's additive masks
def test_left_padding_is_honoured(family):
    """A left-padded row's logits equal the same tokens run alone (window heads only: a
    sink would sit on the padding)."""
    model, compiled = _compiled(family)
    plan = _sparse_plan(compiled.plan, kinds=("window",))
    tokens = _ids(1, 20, 6)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), tokens], dim=1)
    batch = torch.cat([padded, _ids(1, 23, 7)])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    with torch.no_grad(), sparsec.attach(model, plan):
        alone = model(tokens).logits
        together = model(batch, attention_mask=mask).logits
    torch.testing.assert_close(together[:1, 3:], alone, atol=2e-5, rtol=1e-4)


def test_static_cache_generates_as_the_dynamic_cache():
    """A static cache hands attention all its slots; the empty ones are cut before the patterns."""
    model, _ = _compiled("llama")
    prompt = _ids(1, 21, 8)
    with sparsec.attach(model, _compiled_sparse("llama"), decode="sparse"):
        dynamic = _generate(model, prompt)
        static = _generate(model, prompt, cache_implementation="static")
    assert torch.equal(static, dynamic)


def test_soft_capped_gemma2_runs_its_own_attention():
    """Soft-capped sites are left out of the plan (unmatched): attach keeps them on eager."""
    torch.manual_seed(0)
    config = _config("gemma2")
    config.attn_logit_softcapping = 30.0
    model = transformers.Gemma2ForCausalLM(config).eval()
    with pytest.warns(UserWarning, match="soft-capping"):
        compiled = sparsec.compile(model, {"input_ids": _ids(2, 24, 1)}, tolerance=None)
    assert compiled.plan.attention == []
    prompt = _ids(1, 21, 9)
    expected = _generate(model, prompt)
    with sparsec.attach(model, compiled) as attachment:
        assert attachment.sites == [] and model.config._attn_implementation == "sparsec_eager"
        assert torch.equal(_generate(model, prompt), expected)


def test_attach_refuses_a_plan_of_another_model():
    _, compiled = _compiled("llama")
    plan = copy.deepcopy(compiled.plan)
    plan.attention[0].name = "model.layers.7.self_attn"
    model, _ = _compiled("qwen2")
    with pytest.raises(sparsec.ir.errors.InvalidArgumentError, match="names no module"):
        sparsec.attach(model, plan)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.real
def test_smollm2_baseline_plan_generates_the_models_tokens():
    from sparsec.testing.real_models import RealModelUnavailable, load_smollm2, token_batches

    try:
        model, tokenizer = load_smollm2()
    except RealModelUnavailable as error:
        pytest.skip(str(error))
    example = torch.cat(token_batches(tokenizer, "calibration", 64, 2))
    compiled = sparsec.compile(model, {"input_ids": example}, tolerance=None)
    prompt = token_batches(tokenizer, "held_out", 256, 1)[0]
    expected = _generate(model, prompt)
    with sparsec.attach(model, _baseline_plan(compiled.plan)):
        assert torch.equal(_generate(model, prompt), expected)


@pytest.mark.real
def test_bench_e2e_generate_variant_times_dense_and_sparsec(tmp_path):
    from sparsec.tools.cli import main
    from sparsec.testing.real_models import RealModelUnavailable, load_smollm2

    try:
        load_smollm2()
    except RealModelUnavailable as error:
        pytest.skip(str(error))
    path = tmp_path / "e2e.json"
    assert main(["bench", "e2e", "--n", "96", "--check-n", "0", "--calibration-length", "64", "--target", "cpu",
                 "--dtype", "fp32", "--reps", "1", "--warmup", "0", "--no-torch-compile", "--generate", "3",
                 "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["failures"] == {}
    rows = data["generate"]
    assert set(rows) == {"dense", "sparsec"}
    assert all(row["time_to_first_token_ms"] > 0 and row["decode_tokens_per_s"] > 0 for row in rows.values())
    assert 0.0 <= rows["sparsec"]["tokens_equal_to_dense"] <= 1.0
