"""measure_against / Tolerance.against: the dense side of a metric computed once gives
exactly the error measure gives, kept log-probabilities or not."""
import pytest
import torch

from sparsec.ir import budget
from sparsec.ir.budget import measure, measure_against
from sparsec.ir.tolerance import Tolerance


def _outputs(seed: int, rows: int = 1100, vocab: int = 333):
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(1, rows, vocab, generator=generator) * 3
    sparses = [dense + scale * torch.randn(dense.shape, generator=generator) for scale in (0.01, 0.3, 2.0)]
    return {"logits": dense}, [{"logits": s} for s in sparses]


@pytest.mark.parametrize("metric", ["kl", "rel_l2", "cosine"])
def test_against_equals_measure_bitwise(metric):
    dense, sparses = _outputs(0)
    against = Tolerance(metric, 0.1).against(dense)
    for sparse in sparses:
        assert against(sparse) == measure(metric, dense, sparse)
    assert against(sparses[-1]) > against(sparses[0]) > 0


def test_kl_past_the_cache_bound_recomputes_the_same(monkeypatch):
    dense, sparses = _outputs(1)
    expected = [measure("kl", dense, sparse) for sparse in sparses]
    # One 512-row chunk (log p and p) fits; the other two are recomputed on every call.
    monkeypatch.setattr(budget, "KL_CACHE_BYTES", 2 * 512 * 333 * 4)
    against = measure_against("kl", dense)
    assert [against(sparse) for sparse in sparses] == expected
    assert [against(sparse) for sparse in sparses] == expected


@pytest.mark.parametrize("scale", [1e-3, 3e-2, 1.0])
def test_kl_matches_the_float64_definition(scale):
    # A large vocabulary and logits as peaked as a language model's: the fp32 chunks
    # against sum p (log p - log q) in float64.
    generator = torch.Generator().manual_seed(4)
    dense = torch.randn(1, 700, 20000, generator=generator) * 4
    sparse = dense + scale * torch.randn(dense.shape, generator=generator)
    log_p, log_q = (torch.log_softmax(x.double(), -1) for x in (dense, sparse))
    expected = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    measured = measure("kl", {"logits": dense}, {"logits": sparse})
    assert abs(measured - expected) <= 1e-6 + 1e-3 * expected


def test_custom_metric_is_called_with_dense_and_sparse():
    dense, sparses = _outputs(2)
    seen = []

    def max_abs(d, s):
        seen.append(d is dense)
        return float((d["logits"] - s["logits"]).abs().max())

    against = measure_against(max_abs, dense)
    assert against(sparses[1]) == max_abs(dense, sparses[1]) and all(seen)
