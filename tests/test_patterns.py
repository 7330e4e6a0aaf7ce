"""Pattern families: pair counts, symbolic costs, recall from profiles, and fits."""
import math

import pytest
import sympy
import torch

from sparsec.passes.calibrate import profile_from_probabilities
from sparsec.patterns import Elastic, get_pattern
from sparsec.patterns import fitting
from sparsec.patterns.base import N, full_pairs
from sparsec.patterns.vertical_stripe import positional_columns

STATIC_CASES = [
    ("dense", {}),
    ("skip", {}),
    ("window", {"window": [5, 0]}),
    ("window", {"window": [2, 0.05]}),
    ("window", {"window": [500, 0]}),                       # wider than the sequence
    ("sink_window", {"sink": [3, 0], "window": [4, 0]}),
    ("sink_window", {"sink": [9, 0], "window": [2, 0]}),     # sink wider than the window
    ("vertical_stripe", {"columns": [0, 5, 5, 17, 400], "window": [3, 0]}),
    ("multi_diagonal", {"period": [6, 0], "width": [2, 0], "count": 0}),
    ("multi_diagonal", {"period": [4, 0.05], "width": [1, 0], "count": 3}),
    ("block_topk", {"block": 8, "grid": [5, 5], "blocks": [[3, 0], [4, 1], [2, 2], [1, 4]]}),
]


@pytest.mark.parametrize("n", [1, 7, 37, 130])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind,params", STATIC_CASES)
def test_pairs_match_mask_count(kind, params, n, causal):
    pattern = get_pattern(kind)
    assert pattern.pairs(params, n, causal) == pattern.kept_pairs(params, n, n, causal)
    assert 0.0 <= pattern.density(params, n, causal) <= 1.0


@pytest.mark.parametrize("n", [9, 40, 130])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind,params", [  # token sizes (b = 0): elastic ones enter unrounded
    case for case in STATIC_CASES if case[0] in ("dense", "skip", "window", "sink_window")
    and all(not (isinstance(v, list) and v[1]) for v in case[1].values())]
    + [("vertical_stripe", {"columns": [0, 3, 8], "window": [3, 0]})])
def test_symbolic_pairs_are_exact_for_token_sizes(kind, params, n, causal):
    pattern = get_pattern(kind)
    expression = pattern.pairs_expr(params, causal)
    assert expression.free_symbols <= {N}
    assert float(expression.subs(N, n)) == pytest.approx(pattern.pairs(params, n, causal))


@pytest.mark.parametrize("kind,params", [("multi_diagonal", {"period": [16, 0], "width": [2, 0], "count": 0}),
                                         ("multi_diagonal", {"period": [16, 0], "width": [2, 0], "count": 4}),
                                         ("block_topk", {"block": 16, "grid": [8, 8],
                                                         "blocks": [[5, 0], [7, 2], [6, 1]]})])
def test_approximate_symbolic_pairs_are_close(kind, params):
    pattern = get_pattern(kind)
    for n in (128, 512):
        exact = pattern.pairs(params, n, True)
        assert float(pattern.pairs_expr(params, True).subs(N, n)) == pytest.approx(exact, rel=0.1)


def test_cost_is_flops_per_pair_and_dynamic_adds_estimation():
    window = get_pattern("window")
    params = {"window": [8, 0]}
    assert sympy.simplify(window.cost_expr(params, True, 64) - 256 * window.pairs_expr(params, True)) == 0
    slash = get_pattern("vertical_slash")
    vs = {"vertical": [4, 0], "slash": [8, 0], "queries": 32}
    cost = slash.cost_expr(vs, True, 64)
    assert float(cost.subs(N, 1000)) == 256 * 12 * 1000 + 2 * 64 * 32 * 1000
    assert slash.pairs(vs, 1000, True) == 12 * 1000
    assert slash.cost(vs, 1000, True, 64) == float(cost.subs(N, 1000))
    stripes = {"columns": [3, 40], "window": [2, 0.01]}        # window rounds to 3 at n = 100
    expected = 4 * 64 * get_pattern("vertical_stripe").pairs(stripes, 100, False)
    assert get_pattern("vertical_stripe").cost(stripes, 100, False, 64) == expected


@pytest.mark.parametrize("n_q,n_k", [(64, 64), (37, 37), (50, 70), (24, 64), (70, 50)])
def test_block_topk_grid_layout_matches_generic_layout(n_q, n_k):
    pattern = get_pattern("block_topk")
    params = {"block": 8, "grid": [3, 4], "blocks": [[0, 3], [2, 1], [1, 1]]}
    expected = pattern.block_layout(params, n_q, n_k, False, 8, 8)
    assert torch.equal(pattern.grid_layout(params, n_q, n_k), expected)


def test_fit_elastic():
    assert fitting.fit_elastic([(512, 10)]) == Elastic(10.0, 0.0)
    line = fitting.fit_elastic([(256, 16), (512, 24)])
    assert (line.a, line.b) == (8.0, 0.03125)
    covered = fitting.fit_elastic([(100, 5), (200, 9), (300, 12)])
    assert all(covered.at(n) >= size for n, size in [(100, 5), (200, 9), (300, 12)])
    assert fitting.fit_elastic([(100, 9), (200, 5)]).b == 0.0       # sizes never shrink with N


# -- recall and fits on synthetic profiles --

def _uniform_profile(kind, params, n, causal, block=16):
    """A head attending uniformly inside the pattern's own mask."""
    if kind == "vertical_slash":
        columns, diagonals = (torch.tensor([[params[key]]]) for key in ("columns", "diagonals"))
        mask = get_pattern(kind).dynamic_mask(columns, diagonals, n, n, causal)[0, 0]
    else:
        mask = get_pattern(kind).mask(params, n, n, causal)
    mask = mask.double()
    return profile_from_probabilities((mask / mask.sum(-1, keepdim=True))[None], causal, block).head(0)


def _random_profile(n_q, n_k, causal, seed, block=16):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_q, n_k, generator=generator, dtype=torch.float64) * 3
    d = torch.arange(n_q)[:, None] + (n_k - n_q) - torch.arange(n_k)[None, :]
    scores = scores - 0.2 * d.abs()                      # some locality
    if causal:
        scores = scores.masked_fill(d < 0, float("-inf"))
    return profile_from_probabilities(torch.softmax(scores, -1)[None], causal, block).head(0), torch.softmax(scores, -1)


def _exact_recall(probs, mask):
    return float((probs * mask).sum() / probs.shape[0])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_q,n_k", [(90, 90), (53, 53), (48, 96)])
@pytest.mark.parametrize("kind,params", [
    ("window", {"window": [7, 0]}),
    ("multi_diagonal", {"period": [9, 0], "width": [2, 0], "count": 0}),
    ("multi_diagonal", {"period": [9, 0], "width": [3, 0], "count": 2}),
    ("block_topk", {"block": 16, "grid": [6, 6], "blocks": [[5, 0], [3, 1], [4, 4]]}),
    ("sink_window", {"sink": [3, 0], "window": [8, 0]}),              # power-of-two window: exact
    ("vertical_stripe", {"columns": [0, 11, 30], "window": [4, 0]}),
])
def test_recall_from_profile_is_exact(kind, params, n_q, n_k, causal):
    profile, probs = _random_profile(n_q, n_k, causal, seed=n_q)
    pattern = get_pattern(kind)
    expected = _exact_recall(probs, pattern.mask(params, n_q, n_k, causal).double())
    assert pattern.recall(profile, params) == pytest.approx(expected, abs=1e-6)   # fp32 sums


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind,params", [("sink_window", {"sink": [3, 0], "window": [11, 0]}),
                                         ("vertical_stripe", {"columns": [0, 11, 30], "window": [6, 0]})])
def test_estimated_recall_is_close(kind, params, causal):
    profile, probs = _random_profile(120, 120, causal, seed=3)
    pattern = get_pattern(kind)
    expected = _exact_recall(probs, pattern.mask(params, 120, 120, causal).double())
    assert pattern.recall(profile, params) == pytest.approx(expected, abs=0.01)


PLANTED = [
    ("window", {"window": [10, 0]}),
    ("sink_window", {"sink": [4, 0], "window": [16, 0]}),
    # Positional stripes (2 sinks, every 37th key from 12): what a fit may keep.
    ("vertical_stripe", {"columns": positional_columns(2, 37, 12), "window": [8, 0]}),
    ("multi_diagonal", {"period": [20, 0], "width": [3, 0], "count": 0}),
    ("multi_diagonal", {"period": [25, 0], "width": [2, 0], "count": 3}),
    ("vertical_slash", {"columns": [0, 37, 80], "diagonals": [0, 1, 2, 17, 40]}),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind,params", PLANTED)
def test_fit_recovers_planted_parameters(kind, params, causal):
    profile = _uniform_profile(kind, params, 300, causal)
    fitted, recall = get_pattern(kind).fit([profile], 0.999)
    assert recall >= 0.999
    if kind == "vertical_slash":
        assert fitted["vertical"] == [3.0, 0.0] and fitted["slash"] == [5.0, 0.0]
    else:
        assert fitted == params


@pytest.mark.parametrize("causal", [True, False])
def test_fit_recovers_planted_block_layout(causal):
    params = {"block": 16, "grid": [19, 19], "blocks": [[5, 0], [7, 2], [10, 3], [18, 9], [12, 12]]}
    profile = _uniform_profile("block_topk", params, 300, causal)
    pattern = get_pattern("block_topk")
    fitted, recall = pattern.fit([profile], 0.999)
    assert recall >= 0.999
    assert fitted["grid"] == [19, 19]
    assert torch.equal(pattern.grid_layout(fitted, 300, 300), pattern.grid_layout(params, 300, 300))


@pytest.mark.parametrize("kind,params", PLANTED[:-1])
def test_fit_at_lower_recall_is_no_dearer(kind, params):
    profile = _uniform_profile(kind, params, 300, True)
    pattern = get_pattern(kind)
    fitted, recall = pattern.fit([profile], 0.9)
    assert 0.9 <= recall <= 1.0
    assert pattern.pairs(fitted, 300, True) <= pattern.pairs(params, 300, True)


@pytest.mark.parametrize("kind,params", [
    ("window", {"window": [8, 1 / 32]}),
    ("sink_window", {"sink": [2, 0], "window": [8, 1 / 32]}),
    ("multi_diagonal", {"period": [10, 1 / 32], "width": [2, 0], "count": 0}),
])
def test_elastic_fit_across_two_lengths(kind, params):
    profiles = [_uniform_profile(kind, params, n, True) for n in (256, 512)]
    fitted, recall = get_pattern(kind).fit(profiles, 0.999)
    assert fitted == {**params, **({"sink": [2, 0.0]} if kind == "sink_window" else {})}
    assert recall >= 0.999


def test_fits_stay_in_bounds_on_random_heads():
    profile, _probs = _random_profile(77, 77, True, seed=11)
    for kind in ("window", "sink_window", "vertical_stripe", "multi_diagonal", "block_topk", "vertical_slash"):
        params, recall = get_pattern(kind).fit([profile], 0.95)
        assert 0.0 <= recall <= 1.0
        if kind not in ("multi_diagonal", "vertical_slash"):        # these two have bounded reach
            assert recall >= 0.95, (kind, recall)
        assert 0.0 < get_pattern(kind).density(params, 77, True) <= 1.0


def test_column_window_mass_is_exact_at_bucket_edges():
    profile, probs = _random_profile(60, 60, False, seed=5)
    columns = torch.tensor([0, 7, 59])
    widths = torch.tensor([0, 1, 2, 4, 8, 16, 32, 64])
    d = torch.arange(60)[:, None] - torch.arange(60)[None, :]
    expected = torch.stack([((probs * (d.abs() < w))[:, columns]).sum(0) / 60 for w in widths.tolist()], -1)
    torch.testing.assert_close(fitting.column_window_mass(profile, columns, widths), expected)


def test_full_pairs():
    assert full_pairs(10, True) == 55 and full_pairs(10, False) == 100
    assert math.isclose(get_pattern("dense").density({}, 33, True), 1.0)


def test_describe_lists_columns_and_blocks():
    assert get_pattern("vertical_stripe").describe({"columns": [300, 700], "window": [31, 0]}) == \
        "columns=[300, 700], window=31"
    params = {"block": 64, "grid": [32, 32], "blocks": [[3, 1], [9, 2]]}
    assert get_pattern("block_topk").describe(params) == "block=64, 2 of 32x32 blocks"


@pytest.mark.parametrize("kind,params", STATIC_CASES)
def test_reads_bounded_keys_when_the_last_querys_keys_stop_growing(kind, params):
    family = get_pattern(kind)
    keys_read = [int(family.mask(params, 1, n, causal=True).sum()) for n in (500, 1000)]
    assert family.reads_bounded_keys(params) == (keys_read[0] == keys_read[1])


@pytest.mark.parametrize("n_q,n_k", [(256, 256), (200, 300)])
def test_vertical_slash_estimates_from_queries_spread_over_the_sequence(n_q, n_k):
    """The first half of the queries attends to key 5, the second half to key 150: 16
    spread estimating queries keep both columns; the last 16 queries alone (MInference's
    estimate) would see key 150 only. The rows are spread evenly and end at the last query."""
    torch.manual_seed(0)
    vs = get_pattern("vertical_slash")
    params = {"vertical": [3, 0], "slash": [1, 0], "queries": 16}
    rows = vs.estimating_rows(params, n_q)
    assert len(rows) == 16 and int(rows[-1]) == n_q - 1 and int(rows[0]) < n_q // 8
    d = 8
    q = 0.01 * torch.randn(1, 1, n_q, d)
    k = 0.01 * torch.randn(1, 1, n_k, d)
    q[..., : n_q // 2, 0], q[..., n_q // 2:, 1] = 1.0, 1.0
    k[..., 5, 0], k[..., 150, 1] = 40.0, 40.0
    columns, _ = vs.estimate_indices(params, q, k, d ** -0.5, causal=True)
    assert columns[0, 0].tolist() == [0, 5, 150]


def test_estimated_patterns_read_every_key():
    assert not get_pattern("vertical_slash").reads_bounded_keys({"vertical": [4, 0], "slash": [4, 0]})


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_q,n_k,dropped", [(1, 50, 7), (13, 45, 16), (20, 37, 3), (9, 64, 40)])
@pytest.mark.parametrize("kind,params", STATIC_CASES + [("sink_window", {"sink": [2, 0.1], "window": [3, 0.05]})])
def test_without_leading_keys_is_the_mask_without_its_first_columns(kind, params, n_q, n_k, dropped, causal):
    """A rolling cache drops the first keys: the shifted pattern over the keys left is the
    full mask with those columns cut, for the bottom-right query rows."""
    family = get_pattern(kind)
    shifted = family.without_leading_keys(params, dropped, n_q, n_k)
    if kind == "block_topk" and dropped % params["block"]:
        assert shifted is None                   # the block grid would cut through blocks
        return
    expected = family.mask(params, n_q, n_k, causal)[:, dropped:]
    assert torch.equal(get_pattern(shifted[0]).mask(shifted[1], n_q, n_k - dropped, causal), expected)


def _scattered_block_head(n: int, block: int, seed: int) -> torch.Tensor:
    """Probabilities ``[n, n]`` of a causal head whose query blocks each attend to two earlier
    key blocks of their own (content, not position) and their diagonal block."""
    generator = torch.Generator().manual_seed(seed)
    blocks = -(-n // block)
    layout = torch.eye(blocks, dtype=torch.bool)
    for row in range(2, blocks):
        layout[row, torch.randperm(row, generator=generator)[:2]] = True
    mask = layout.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :n] & torch.ones(n, n).tril().bool()
    mask = mask.double()
    return mask / mask.sum(-1, keepdim=True)


def test_dynamic_blocks_fit_keeps_a_scattered_layout_where_columns_and_diagonals_cannot():
    """Content-placed blocks: no column + diagonal budget holds them at 0.95, a per-query-block
    layout at share 0.8 does, at a third of the causal pairs; and the layout the estimate
    finds on inputs whose attention is that head's is the planted one."""
    n, block = 320, 16
    probs = _scattered_block_head(n, block, seed=4)
    profile = profile_from_probabilities(probs[None], True, block).head(0)
    fitted, recall = get_pattern("dynamic_blocks").fit([profile], 0.95)
    assert recall >= 0.95 and fitted["share"] == 0.8 and fitted["block"] == block
    assert fitted["density"][:2] == [pytest.approx(fitted["density"][0]), n] and fitted["density"][0] < 0.35
    # Two earlier blocks a row at every length: the kept share falls as 1 / N (decay 1, capped).
    assert fitted["density"][2] > 0.5
    family = get_pattern("dynamic_blocks")
    assert family.pairs(fitted, 2 * n, True) < 0.7 * 4 * family.pairs(fitted, n, True)
    assert float(family.pairs_expr(fitted, True).subs(N, 2 * n)) == pytest.approx(family.pairs(fitted, 2 * n, True))
    slash_params, slash_recall = get_pattern("vertical_slash").fit([profile], 0.95)
    assert slash_recall < 0.95 or get_pattern("vertical_slash").density(slash_params, n, True) > 0.5


def test_dynamic_blocks_is_modelled_on_each_calibration_inputs_own_layout():
    """Two inputs whose heads attend to different key blocks: the family keeps each input's
    own blocks (recall at least the share, density as one input's), where the layout of
    their mean mass would keep both inputs' blocks."""
    from sparsec.passes.calibrate import _ProfileSums
    from sparsec.patterns.base import offsets
    from sparsec.patterns.dynamic_blocks import keep_by_share
    from sparsec.patterns.shared import diagonal_blocks, tile_pairs
    n, block = 320, 16
    sums = _ProfileSums(1, n, n, block)
    rows = cols = torch.arange(n)
    index = sums.indices(rows, cols, offsets(rows, cols, n, n))
    for seed in (4, 5):
        probs = _scattered_block_head(n, block, seed)
        sums.start_batch(1)
        sums.add(slice(None), probs[None, None].float(), torch.ones(1, 1, n, dtype=torch.bool), index)
    profile = sums.profile(True).head(0)
    family = get_pattern("dynamic_blocks")
    params = {"block": block, "samples": 8, "share": 0.8, "density": [1.0, n, 0.0]}
    assert family.recall(profile, params) >= 0.8
    one_input = profile_from_probabilities(_scattered_block_head(n, block, 4)[None], True, block).head(0)
    assert family._profile_density(profile, params, n // block) == pytest.approx(
        family._profile_density(one_input, params, n // block), rel=0.1)
    forced = diagonal_blocks(n, n, block)
    forced[:, 0] = True
    of_mean = keep_by_share(profile.block_mass, forced, 0.8)
    mean_density = float((tile_pairs(n, block, True) * of_mean).sum()) / (n * (n + 1) / 2)
    assert mean_density > 1.3 * family._profile_density(profile, params, n // block)


def test_dynamic_blocks_recall_counts_what_its_estimate_misses():
    """From query block 3 on, the rows the estimate samples attend key block 1 and every other
    row key block 2: the layout the estimate chooses keeps block 1 alone, and the fit's recall
    says so (every row's mass would keep both blocks: recall 1)."""
    from sparsec.patterns.fitting import SAMPLED_ROWS, spread_rows
    n, block = 512, 64
    sampled = torch.zeros(n, dtype=torch.bool)
    sampled[spread_rows(block, SAMPLED_ROWS, n)] = True
    probs = torch.zeros(n, n)
    rows = torch.arange(n)
    early = rows < 3 * block
    probs[rows[early], rows[early]] = 1.0                      # the diagonal: a forced block
    late = ~early
    probs[rows[late & sampled], block] = 1.0                   # key block 1
    probs[rows[late & ~sampled], 2 * block] = 1.0              # key block 2
    profile = profile_from_probabilities(probs[None], True, block).head(0)
    family = get_pattern("dynamic_blocks")
    params = {"block": block, "samples": SAMPLED_ROWS, "share": 0.9, "density": [1.0, n, 0.0]}
    missed = int((late & ~sampled).sum())
    assert family.recall(profile, params) == pytest.approx(1 - missed / n)
    assert family.recall(profile, params) < 0.6


def test_dynamic_blocks_estimate_is_priced_by_the_keys_its_kernel_reads():
    """One pass of ``samples`` rows a block over the keys: every key without a causal cut,
    half of them on average under it (the kernel stops at each program's last diagonal)."""
    from sparsec.patterns.base import N
    family = get_pattern("dynamic_blocks")
    params = {"block": 64, "samples": 16, "share": 0.95, "density": [0.3, 4096, 0.0]}
    n, head_dim = 4096, 64
    rows = 16 * n // 64
    assert float(family.overhead_expr(params, head_dim, False).subs(N, n)) == 2 * head_dim * rows * n
    assert float(family.overhead_expr(params, head_dim, True).subs(N, n)) == 2 * head_dim * rows * n / 2


def test_dynamic_blocks_estimate_keeps_the_heavy_blocks_and_the_forced_ones():
    """Keys planted to draw a query block's rows: the estimate keeps their block, the sink
    block and the diagonal ones, and no block without mass."""
    from sparsec.patterns.dynamic_blocks import keep_by_share

    mass = torch.tensor([[0.0, 0.5, 0.3, 0.2, 0.0], [0.1, 0.0, 0.0, 0.6, 0.3]])
    forced = torch.tensor([[True, False, False, False, False], [False, False, False, False, True]])
    kept = keep_by_share(mass, forced, 0.75)
    assert kept.tolist() == [[True, True, True, False, False], [False, False, False, True, True]]
    n, d, block = 96, 16, 16
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, n, d, generator=generator), torch.randn(1, 1, n, d, generator=generator)
    k[..., 36, :] = q[..., 70:80, :].mean(-2) * 6             # the rows of query block 4 look at key 36
    params = {"block": block, "samples": 4, "share": 0.5, "density": [0.3, n, 0]}
    layout, got_block = get_pattern("dynamic_blocks").estimate_indices(params, q, k, d ** -0.5, causal=True)
    assert got_block == block and layout.shape == (1, 1, 6, 6)
    assert layout[0, 0, 4, 2] and layout[0, 0, :, 0].all() and layout[0, 0].diagonal().all()
    assert not layout[0, 0].triu(1).any()                     # causal: no block after the diagonal
