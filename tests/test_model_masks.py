"""Masks the model builds are kept or replaced exactly, never guessed from calibration.

fold_causal_mask decides from the graph (the mask's producers evaluated at probe lengths),
so a sliding window that looks causal on short calibration inputs still becomes the
model's own window, and a mask that is causal only at short lengths is kept.
"""
import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import sparsec
from sparsec.passes.helpers.attention_sites import ATTENTION, SPARSE_ATTENTION
from sparsec.passes.fold_causal_mask import probe_lengths
from sparsec.patterns.base import baseline_pattern

VOCAB = 128


def _ids(batch, length, seed):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _mistral(window: int, seed: int = 0):
    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           sliding_window=window, use_cache=False, attn_implementation="sdpa")
    return MistralForCausalLM(config).eval()


def _attention_nodes(cm):
    return [n for n in cm.graph_module.graph.nodes if n.op == "call_function" and n.target in (ATTENTION, SPARSE_ATTENTION)]


def _assert_same_output(cm, model, ids):
    with torch.no_grad():
        torch.testing.assert_close(cm(input_ids=ids)[0], model(input_ids=ids)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,calibrate,run", [(8, 6, 40), (64, 24, 150), (16, 48, 100)])
def test_sliding_window_becomes_the_models_window(window, calibrate, run):
    """Calibrated shorter (the mask looked causal) or longer than the window: the site gets
    causal=True plus window(w) on every head, and the output equals the model's at a
    length past the window."""
    model = _mistral(window)
    cm = sparsec.compile(model, {"input_ids": _ids(2, calibrate, 1)},
                         calibration=[{"input_ids": _ids(2, calibrate, 2)}], recall=1.0)
    for site in cm.plan.attention:
        assert site.causal and not site.has_mask and site.extra["model_window"] == window
        assert baseline_pattern(site) == ("window", {"window": [window, 0]})
        assert all((h.pattern, h.params) == ("window", {"window": [window, 0]}) for h in site.heads)
        assert "sliding window" in site.heads[0].reason
    nodes = _attention_nodes(cm)
    assert len(nodes) == 2 and all(n.target == SPARSE_ATTENTION and n.args[3] is None and n.args[5] for n in nodes)
    _assert_same_output(cm, model, _ids(2, run, 3))
    _assert_same_output(cm, model, _ids(1, window + 1, 4))


def test_sliding_window_survives_a_budget_search():
    """The search re-decides every head it sees; the model's window heads are not among
    them, so they never become dense-without-mask."""
    model = _mistral(8, seed=1)
    cm = sparsec.compile(model, {"input_ids": _ids(2, 6, 5)},
                         calibration=[{"input_ids": _ids(2, 6, s)} for s in (6, 7, 8)],
                         budget=sparsec.Budget(max_error=0.5))
    for site in cm.plan.attention:
        assert all(h.pattern == "window" and h.params == {"window": [8, 0]} for h in site.heads)
    _assert_same_output(cm, model, _ids(2, 40, 9))


def test_qwen2_sliding_layers():
    """Qwen2 with sliding-window layers from max_window_layers on: full layers fold to
    causal, sliding layers get the window."""
    torch.manual_seed(2)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         use_sliding_window=True, sliding_window=12, max_window_layers=1, use_cache=False,
                         attn_implementation="sdpa")
    assert config.layer_types == ["full_attention", "sliding_attention"]
    model = Qwen2ForCausalLM(config).eval()
    cm = sparsec.compile(model, {"input_ids": _ids(2, 10, 1)}, recall=1.0)
    full, sliding = cm.plan.attention
    assert full.causal and not full.has_mask and "model_window" not in full.extra
    assert {h.pattern for h in full.heads} == {"dense"}
    assert sliding.extra["model_window"] == 12
    assert {(h.pattern, str(h.params)) for h in sliding.heads} == {("window", "{'window': [12, 0]}")}
    _assert_same_output(cm, model, _ids(2, 45, 2))


def test_gemma_sliding_and_full_layers():
    """Gemma 2 (eager attention, soft-capping off) alternates sliding and full layers."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(4)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                          sliding_window=8, use_cache=False, attn_implementation="eager",
                          attn_logit_softcapping=None, final_logit_softcapping=None)
    assert config.layer_types == ["sliding_attention", "full_attention"]
    model = Gemma2ForCausalLM(config).eval()
    cm = sparsec.compile(model, {"input_ids": _ids(2, 6, 1)}, recall=1.0)
    sliding, full = cm.plan.attention
    assert sliding.extra["model_window"] == 8 and "model_window" not in full.extra
    assert full.causal and not full.has_mask
    _assert_same_output(cm, model, _ids(2, 40, 2))


class ChunkedMaskAttention(torch.nn.Module):
    """Attention under an in-graph mask that is causal up to 16 tokens and block-diagonal
    causal (chunks of 16, as Llama 4's chunked attention) past that."""

    def __init__(self, dim=24, heads=4, head_dim=8, chunk=16):
        super().__init__()
        self.heads, self.head_dim, self.chunk = heads, head_dim, chunk
        self.qkv = torch.nn.Linear(dim, 3 * heads * head_dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        position = torch.arange(n, device=x.device)
        mask = (position[None, :] <= position[:, None]) & (position[None, :] // self.chunk == position[:, None] // self.chunk)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return y.transpose(1, 2).flatten(2)


def test_mask_causal_only_at_short_lengths_is_kept():
    torch.manual_seed(3)
    model = ChunkedMaskAttention().eval()
    cm = sparsec.compile(model, (torch.randn(2, 12, 24),), recall=1.0)     # causal at 12 tokens
    site, = cm.plan.attention
    assert site.has_mask and not site.causal and "model_window" not in site.extra
    assert any("mask kept" in note for note in site.notes)
    x = torch.randn(2, 40, 24)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x), rtol=1e-5, atol=1e-5)


def test_probe_lengths_straddle_every_constant():
    lengths = probe_lengths({8, 100}, {24})
    assert {7, 8, 9, 17, 99, 100, 101, 201, 24, 1, 2}.issubset(lengths)
    assert max(lengths) >= 201


# -- vertical_slash's run-time estimate sees the site's mask --

def _padded_slash_inputs(seed: int = 0):
    """q, k ``[2, 2, 48, 16]`` with batch row 1 right-padded from key 36 on, its padded keys
    made the most attended (as an ignored padding mask lets them be), and a mask keeping
    causal keys of the unpadded part only."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, 48, 16, generator=generator)
    k = torch.randn(2, 2, 48, 16, generator=generator)
    direction = torch.randn(16, generator=generator)
    q[1, :, 16:] += direction
    k[1, :, 36:] += 2 * direction
    valid = torch.ones(2, 48, dtype=torch.bool)
    valid[1, 36:] = False
    mask = torch.ones(48, 48, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    return q, k, mask


@pytest.mark.parametrize("form", ["bool", "additive"])
def test_vertical_slash_estimate_never_picks_masked_keys(form):
    from sparsec.patterns import get_pattern
    q, k, mask = _padded_slash_inputs()
    user_mask = mask if form == "bool" else torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    pattern = get_pattern("vertical_slash")
    params = {"vertical": [6, 0], "slash": [4, 0], "queries": 32}
    blind, _ = pattern.estimate_indices(params, q, k, 0.25, True)
    assert (blind[1] >= 36).any()                         # ignoring the mask picks padded keys
    columns, diagonals = pattern.estimate_indices(params, q, k, 0.25, True, user_mask)
    assert columns.shape == (2, 2, 6) and diagonals.shape == (2, 2, 4)
    assert not (columns[1] >= 36).any(), columns[1]
    assert (columns[..., 0] == 0).all() and (diagonals == 0).any(-1).all()
    # Every picked diagonal has a pair the mask keeps among the estimating queries.
    rows = torch.arange(16, 48)
    for b in range(2):
        for h in range(2):
            for offset in diagonals[b, h].tolist():
                keys = rows - offset
                inside = (keys >= 0) & (keys < 48)
                assert mask[b, 0, rows[inside], keys[inside]].any(), (b, h, offset)


def test_vertical_slash_masked_diagonals_rank_last():
    """A sliding-window mask of 6 keys: the estimate keeps offsets 0..5 only, though the
    scores (a strong far diagonal) would pick others."""
    from sparsec.patterns import get_pattern
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 40, 8, generator=generator)
    k = torch.roll(q, shifts=-20, dims=2) * 3 + 0.1 * torch.randn(1, 2, 40, 8, generator=generator)
    d = torch.arange(40)[:, None] - torch.arange(40)[None, :]
    window = ((d >= 0) & (d < 6))[None, None]
    params = {"vertical": [1, 0], "slash": [6, 0], "queries": 16}
    pattern = get_pattern("vertical_slash")
    blind = pattern.estimate_indices(params, q, k, 0.35, True)[1]
    assert (blind >= 6).any()
    diagonals = pattern.estimate_indices(params, q, k, 0.35, True, window)[1]
    assert diagonals.tolist() == [[[0, 1, 2, 3, 4, 5]] * 2]


def test_gpu_path_estimate_matches_the_reference_with_a_mask():
    """runtime.kernels' estimate (the estimating queries and their mask rows gathered per group) is
    the reference estimate on the full tensors."""
    from sparsec.patterns import get_pattern
    from sparsec.ir.plan import HeadGroup
    from sparsec.runtime.kernels import estimate_dynamic
    q, k, mask = _padded_slash_inputs(seed=2)
    q4 = torch.cat([q, q.flip(1)], 1)                      # 4 query heads on 2 KV heads
    mask4 = mask.expand(2, 4, 48, 48)
    group = HeadGroup("vertical_slash", {"vertical": [5, 0], "slash": [3, 0], "queries": 16}, [1, 3])
    got = estimate_dynamic(q4, k, group, 0.25, True, mask4)
    heads = torch.tensor([1, 3])
    expected = get_pattern("vertical_slash").estimate_indices(group.params, q4[:, heads], k[:, heads // 2], 0.25,
                                                              True, mask4[:, heads])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert not (got[0][1] >= 36).any()
