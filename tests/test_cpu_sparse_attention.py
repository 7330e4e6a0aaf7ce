"""The CPU path of ``sparsec::sparse_attention`` (runtime/cpu_attention.py, ``sparse_attention``):
each chunk of queries reads only the keys its rows keep; checked against the reference kernel (the
oracle) at awkward shapes, and shown to be what the op runs for CPU tensors."""
from __future__ import annotations

import pytest
import torch

from sparsec.ir import ops  # noqa: F401  (registers torch.ops.sparsec)
from sparsec.ir.plan import HeadGroup, encode_groups
from sparsec.runtime import cpu_attention
from sparsec.ir import reference

GROUPS = [
    # whole GQA groups (K/V gathered once per kv head) and split ones (K/V per query head)
    HeadGroup("window", {"window": [5, 0.1]}, [0, 1]),
    HeadGroup("sink_window", {"sink": [2, 0], "window": [4, 0]}, [2]),
    HeadGroup("dense", {}, [3, 5]),
    HeadGroup("vertical_stripe", {"columns": [0, 7, 30, 100], "window": [3, 0]}, [4]),
    HeadGroup("multi_diagonal", {"period": [16, 0], "width": [3, 0], "count": 3}, [6]),
    HeadGroup("vertical_slash", {"vertical": [3, 0.05], "slash": [3, 0], "queries": 8}, [7]),
]


def _inputs(batch, heads, kv_heads, n, dim, dtype, mask_kind, causal):
    q = torch.randn(batch, heads, n, dim).to(dtype)
    k, v = torch.randn(batch, kv_heads, n, dim).to(dtype), torch.randn(batch, kv_heads, n, dim).to(dtype)
    mask = None
    if mask_kind == "padding_bool":          # True = attend; row 1 ends in 5 padded keys
        mask = torch.ones(batch, 1, 1, n, dtype=torch.bool)
        mask[-1, ..., n - 5:] = False
    elif mask_kind == "additive_per_head" and not causal:      # SDPA: a mask or is_causal
        mask = torch.randn(batch, heads, n, n).to(dtype)
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,mask_kind", [(37, None), (131, "padding_bool"), (70, "additive_per_head")])
def test_cpu_path_matches_reference(dtype, causal, n, mask_kind, monkeypatch):
    torch.manual_seed(n)
    q, k, v, mask = _inputs(2, 8, 2, n, 16, dtype, mask_kind, causal)
    expected = reference.sparse_attention(q, k, v, mask, 0.25, causal, GROUPS)
    got = cpu_attention.sparse_attention(q, k, v, mask, 0.25, causal, GROUPS, rows=16)      # several chunks
    assert got.dtype == dtype and got.shape == expected.shape
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(got, expected, **tolerance)


def test_op_runs_the_cpu_path_on_cpu_tensors(monkeypatch):
    torch.manual_seed(0)
    q, k, v, mask = _inputs(2, 8, 2, 45, 16, torch.float32, "padding_bool", True)
    calls = []
    original = cpu_attention.group_attention
    monkeypatch.setattr(cpu_attention, "group_attention",
                        lambda *args, **kwargs: calls.append(args[6]) or original(*args, **kwargs))
    got = torch.ops.sparsec.sparse_attention(q, k, v, mask, 0.25, True, encode_groups(GROUPS))
    assert set(calls) == {g.pattern for g in GROUPS if g.pattern != "dense"}
    expected = reference.sparse_attention(q, k, v, mask, 0.25, True, GROUPS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cpu_path_reads_only_kept_keys():
    # a causal 64-key window at N = 2048 in chunks of 128 rows: each chunk after the first
    # reads its 128 rows' keys and the 63 before them
    plan = cpu_attention.static_plan("window", '{"window": [64, 0]}', 2048, 2048, True, cpu_attention.CPU_ROWS)
    assert plan.gathered_fraction == pytest.approx((128 + 15 * 191) / 2048 ** 2 * 128)
