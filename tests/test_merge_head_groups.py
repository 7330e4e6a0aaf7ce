"""merge_head_groups: near-equal head groups share one launch where the cost model says so."""
import pytest

from sparsec.analysis.cost_model import CostModel
from sparsec.passes.merge_head_groups import merge_site
from sparsec.patterns import get_pattern
from sparsec.ir.plan import AttentionSite, HeadPlan


def _site(patterns):
    heads = [HeadPlan(h, kind, params, 0.96, None, [], "fastest pattern") for h, (kind, params) in enumerate(patterns)]
    site = AttentionSite("layers.0.attn", 0, len(heads), len(heads), 64, True, heads)
    site.regroup()
    return site


WINDOWS = [("window", {"window": [w, 0]}) for w in (60, 61, 62, 64)]


def test_near_equal_windows_become_one_launch_at_length():
    site = _site([*WINDOWS, ("dense", {})])
    record = merge_site(site, CostModel("h100"), 16384, None)
    assert record.merges == 3 and record.seconds_after < record.seconds_before
    assert [(g.pattern, g.params, g.heads) for g in site.groups] == [
        ("window", {"window": [64, 0]}, [0, 1, 2, 3]), ("dense", {}, [4])]
    assert "share one launch" in site.heads[0].reason and site.heads[3].reason == "fastest pattern"


def test_sparse_that_does_not_pay_for_its_launches_goes_dense():
    site = _site([*WINDOWS, ("sink_window", {"sink": [4, 0], "window": [100, 0]})])
    record = merge_site(site, CostModel("h100"), 256, None)
    assert record.seconds_after == record.dense_seconds <= record.seconds_before
    assert all(h.pattern == "dense" and "launch" in h.reason for h in site.heads)


def _nine_heads(kind, params, n_heads=9):
    site = _site([(kind, params)] * n_heads)
    return [(g.pattern, g.params, len(g.heads)) for g in site.groups]


def test_a_site_costs_the_larger_of_its_gpu_and_host_times_where_the_host_was_measured(monkeypatch):
    """SmolLM2's shape (9 heads, head dim 64): on short inputs a sparse site's host time (its
    group table, one launch per group) exceeds its GPU time and the dense site's cost, so it
    goes dense; on long inputs the GPU time is the price. A dynamic group pays its per-call
    estimate on the host (some 60 small kernels, replayed as one CUDA graph). (The Triton
    kernels' host times: FA4 off.)"""
    import dataclasses

    monkeypatch.setenv("SPARSEC_FA4", "0")

    cost = CostModel("h200")
    host = cost.profile.host
    gpu_only = CostModel("h200")
    gpu_only.profile = dataclasses.replace(cost.profile, host=None)
    window = _nine_heads("sink_window", {"sink": [1, 0], "window": [128, 0]})
    assert gpu_only.site_seconds(window, 1024, True, 64) < host.sparse_seconds(1, 0, False)
    assert cost.site_seconds(window, 1024, True, 64) == host.sparse_seconds(1, 0, False)
    assert cost.site_seconds(window, 1024, True, 64) > cost.site_seconds([("dense", {}, 9)], 1024, True, 64)
    wide = _nine_heads("sink_window", {"sink": [1, 0], "window": [2048, 0]})
    assert cost.site_seconds(wide, 32768, True, 64) == gpu_only.site_seconds(wide, 32768, True, 64) \
        > host.sparse_seconds(1, 0, False)
    assert cost.site_seconds(wide, 32768, True, 64) < cost.site_seconds([("dense", {}, 9)], 32768, True, 64)
    dynamic = _nine_heads("vertical_slash", {"queries": 64, "vertical": [64, 0], "slash": [64, 0]})
    assert cost.site_seconds(dynamic, 8192, True, 64) >= host.sparse_seconds(1, 1, False) \
        > host.sparse_seconds(1, 0, False) + 1e-4                # the H200's host: ~0.18 ms an estimate
    site = _site([("sink_window", {"sink": [1, 0], "window": [128, 0]})] * 9)
    record = merge_site(site, cost, 1024, None)
    assert record.seconds_after == record.dense_seconds and all(h.pattern == "dense" for h in site.heads)


def test_on_the_cpu_a_site_must_save_the_profiles_margin_or_it_goes_dense():
    """The cpu profile's timings spread ~15 % around its fit, so a CPU site predicted a few
    percent faster than dense would run slower about as often: it must save the profile's
    margin (``min_site_saving``, from the fit's slowest tenth of points). GPU profiles take
    any predicted saving."""
    cpu, gpu = CostModel("cpu"), CostModel("h100")
    margin = cpu.profile.min_site_saving
    assert 0.05 < margin < 0.3 and gpu.profile.min_site_saving == 0.0
    assert cpu.site_pays((1 - margin) * 0.99, 1.0) and not cpu.site_pays((1 - margin) * 1.01, 1.0)
    assert gpu.site_pays(0.99, 1.0) and not gpu.site_pays(1.0, 1.0)
    # Two window-256 heads beside seven dense heads (SmolLM2's shape) at 2k: predicted faster
    # than dense, by less than the margin, so the site goes dense on the cpu target.
    site = _site([("sink_window", {"sink": [1, 0], "window": [256, 0]})] * 2 + [("dense", {})] * 7)
    sizes = [(g.pattern, g.params, len(g.heads)) for g in site.groups]
    sparse, dense = cpu.site_seconds(sizes, 2048, True, 64), cpu.site_seconds([("dense", {}, 9)], 2048, True, 64)
    assert (1 - margin) * dense < sparse < dense
    record = merge_site(site, cpu, 2048, None)
    assert record.seconds_after == record.dense_seconds and all(h.pattern == "dense" for h in site.heads)


@pytest.mark.parametrize("kind,first,second", [
    ("window", {"window": [4, 0.1]}, {"window": [9, 0]}),
    ("sink_window", {"sink": [2, 0], "window": [5, 0]}, {"sink": [1, 0.01], "window": [3, 0]}),
    ("vertical_stripe", {"columns": [0, 5], "window": [3, 0]}, {"columns": [0, 1, 9], "window": [2, 0.05]}),
    ("multi_diagonal", {"period": [7, 0], "width": [1, 0], "count": 2},
     {"period": [7, 0], "width": [2, 0], "count": 3}),
    ("multi_diagonal", {"period": [7, 0], "width": [3, 0], "count": 0},
     {"period": [7, 0], "width": [2, 0], "count": 3}),
    ("block_topk", {"block": 8, "grid": [4, 4], "blocks": [[1, 0], [3, 1]]},
     {"block": 8, "grid": [4, 4], "blocks": [[2, 0], [3, 1]]}),
])
def test_merged_parameters_hold_both_masks(kind, first, second):
    pattern = get_pattern(kind)
    union = pattern.merge(first, second)
    for n in (29, 64, 100):
        both = pattern.mask(first, n, n, True) | pattern.mask(second, n, n, True)
        merged = pattern.mask(union, n, n, True)
        assert bool((merged | ~both).all()), f"{kind} at {n}: the merged mask drops pairs"


def test_families_without_a_union_refuse():
    assert get_pattern("multi_diagonal").merge({"period": [7, 0], "width": [1, 0], "count": 2},
                                               {"period": [8, 0], "width": [1, 0], "count": 2}) is None
    assert get_pattern("block_topk").merge({"block": 8, "grid": [4, 4], "blocks": []},
                                           {"block": 16, "grid": [4, 4], "blocks": []}) is None
    assert get_pattern("dense").merge({}, {}) is None


def test_the_cpu_prices_a_layouts_chunks_over_the_union_of_their_rows():
    """The CPU path runs each chunk of 128 query rows over the union of their kept keys: a
    block_topk layout with one long row costs there as if its chunk's other row were that long
    too. GPU kernels walk each row's own list."""
    from sparsec.analysis.cost_model import head_flops

    grid = 8
    diagonal = [[i, i] for i in range(grid)]
    long_row = {"block": 64, "grid": [grid, grid], "blocks": diagonal + [[grid - 1, j] for j in range(grid - 1)]}
    padding = get_pattern("block_topk").chunk_padding(long_row, 512, True, 128)
    # Chunks of two 64-row layout rows: three keep 2 blocks (their diagonals), the last 8
    # (the long row's); 15 blocks kept.
    assert padding == pytest.approx(2 * (2 + 2 + 2 + 8) / 15)
    assert get_pattern("window").chunk_padding({"window": [64, 0]}, 512, True, 128) == 1.0
    cpu, gpu = CostModel("cpu"), CostModel("h100")
    rates = cpu.profile.sparse
    rows = 4 * rates.row_block_us * 1e-6 * 64 / 128
    flops = head_flops("block_topk", long_row, 512, True, 64)
    assert cpu.head_seconds("block_topk", long_row, 512, True, 64) == pytest.approx(
        flops * padding / (rates.tflops * 1e12) + rows)
    assert gpu.head_seconds("block_topk", long_row, 512, True, 64) == pytest.approx(
        flops / (gpu.profile.sparse.tflops * 1e12) + 4 * gpu.profile.sparse.row_block_us * 1e-6 * 64 / 128)
