"""Invalid arguments to ``sparsec.compile`` raise typed errors (``InvalidArgumentError``, a
``ValueError``) that name the valid range or the offending batch and input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sparsec
from sparsec.ir.errors import InvalidArgumentError, SparsecError


class SdpaBlock(torch.nn.Module):
    """One SDPA attention over ``x`` with an optional additive ``bias`` keyword input."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv, self.o = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x, bias=None):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o(y.transpose(1, 2).reshape(b, n, d))


def _x(batch: int = 2, n: int = 16) -> torch.Tensor:
    return torch.randn(batch, n, 32)


@pytest.mark.parametrize("recall", [0.0, -0.5, 1.5, math.nan, math.inf])
def test_recall_outside_the_unit_interval(recall):
    with pytest.raises(InvalidArgumentError, match=r"\(0, 1\]") as info:
        sparsec.compile(SdpaBlock().eval(), (_x(),), recall=recall)
    assert isinstance(info.value, ValueError) and isinstance(info.value, SparsecError)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_example_inputs_name_the_input(bad):
    x = _x()
    x[1, 3, 5] = bad
    kind = "NaN" if math.isnan(bad) else "infinity"
    with pytest.raises(InvalidArgumentError, match=rf"example_inputs: positional input \[0\] holds {kind}"):
        sparsec.compile(SdpaBlock().eval(), (x,))


def test_non_finite_calibration_names_batch_and_keyword_input():
    model = SdpaBlock().eval()
    example = {"x": _x(), "bias": torch.randn(2, 1, 16, 16)}
    broken = {"x": _x(), "bias": torch.randn(2, 1, 16, 16)}
    broken["bias"][0, 0, 2, 2] = math.nan
    calibration = [{"x": _x(), "bias": torch.randn(2, 1, 16, 16)}, broken]
    with pytest.raises(InvalidArgumentError, match=r"calibration batch 1: keyword input \['bias'\] holds NaN"):
        sparsec.compile(model, example, calibration=calibration)


@pytest.mark.parametrize("patterns", [["windw"], ["window", "stripes"], []])
def test_unknown_pattern_families_name_the_known_ones(patterns):
    with pytest.raises(InvalidArgumentError, match=r"patterns=.*sink_window.*dynamic_blocks"):
        sparsec.compile(SdpaBlock().eval(), (_x(),), patterns=patterns)
