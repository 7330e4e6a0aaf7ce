"""calibrate and classify_heads: statistics against brute force, and planted-pattern recovery."""
import functools
import warnings
import math

import pytest
import torch

from sparsec.passes.infra.pass_manager import CompileContext, PassManager
from sparsec.passes.calibrate import Calibrate
from sparsec.passes.canonicalize import Canonicalize
from sparsec.passes.helpers.capture import capture
from sparsec.passes.classify_heads import ClassifyHeads
from sparsec.patterns import get_pattern, instance_key, pattern_kinds
from sparsec.patterns.fitting import SAMPLED_ROWS, offset_bucket, spread_queries, spread_rows
from sparsec.ir.plan import Plan
from sparsec.ir.targets import get_target
from sparsec.testing import PlantedAttention, planted_attention_probs, planted_llama, planted_llama_inputs
from sparsec.testing.planted import DEFAULT_PLANT


class MaskedAttention(torch.nn.Module):
    """One attention site with GQA, called directly, with an optional mask input."""

    def __init__(self, dim=24, heads=4, kv_heads=2, head_dim=8, causal=True):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.causal = heads, kv_heads, head_dim, causal
        self.q = torch.nn.Linear(dim, heads * head_dim)
        self.k = torch.nn.Linear(dim, kv_heads * head_dim)
        self.v = torch.nn.Linear(dim, kv_heads * head_dim)

    def project(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2) * 3   # peakier than random init
        k = self.k(x).view(b, n, self.kv_heads, -1).transpose(1, 2)
        return q, k, self.v(x).view(b, n, self.kv_heads, -1).transpose(1, 2)

    def forward(self, x, mask=None):
        q, k, v = self.project(x)
        y = torch.ops.sparsec.attention(q, k, v, mask, self.head_dim ** -0.5, self.causal)
        return y.transpose(1, 2).flatten(2)


# Statistics are summed in fp32 per chunk (then float64), so compare to 1e-6.
close = functools.partial(torch.testing.assert_close, rtol=1e-5, atol=1e-6)


def run_passes(model, example, calibration, passes, target="cpu", **asked):
    """Run ``passes`` after canonicalize; ``asked`` sets CompileContext fields (recall, min_saving, patterns)."""
    gm, _record = capture(model, example, {})
    ctx = CompileContext(plan=Plan(target=target), target=get_target(target), example_args=example,
                         example_kwargs={}, calibration=[(batch, {}) for batch in calibration], **asked)
    PassManager([Canonicalize(), *passes]).run(gm, ctx)
    return ctx


def brute_force_probs(model, x, mask):
    """[B, H, n, n] probabilities by the reference semantics, padding rows zeroed."""
    q, k, _v = model.project(x)
    k = k.repeat_interleave(model.heads // model.kv_heads, 1)
    scores = (q @ k.transpose(-1, -2)).double() * model.head_dim ** -0.5
    n = x.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool)
    if model.causal:
        allowed = torch.ones(n, n).tril().bool()
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask
    elif mask is not None:
        scores = scores + mask
        allowed = allowed & (mask > -1e4)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return probs * allowed.expand_as(probs).any(-1, keepdim=True)


def padding_mask(batch, n, additive):
    """Row b pads its last 3b tokens (keys and queries): bool or additive (finfo.min) form."""
    keep = torch.ones(batch, n, dtype=torch.bool)
    for b in range(batch):
        keep[b, n - 3 * b:] = False
    mask = (keep[:, None, :, None] & keep[:, None, None, :])
    if additive:
        return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


@pytest.mark.parametrize("batch,n,causal,mask_kind", [
    (1, 37, True, None), (3, 29, False, "bool"), (2, 45, True, "additive"), (2, 64, False, None)])
def test_statistics_match_brute_force(batch, n, causal, mask_kind, monkeypatch):
    from sparsec.passes import calibrate
    monkeypatch.setattr(calibrate, "ESTIMATING_QUERIES", 8)        # fewer than n: some rows, not all
    torch.manual_seed(n)
    model = MaskedAttention(causal=causal).eval()
    x = torch.randn(batch, n, 24)
    mask = None if mask_kind is None else padding_mask(batch, n, mask_kind == "additive")
    example = (x,) if mask is None else (x, mask)
    ctx = run_passes(model, example, [example], [Calibrate(chunk_elements=500)], target="a100")
    stats = ctx.attention_stats[ctx.plan.attention[0].name]
    profile = stats.profiles[(n, n)]

    probs = brute_force_probs(model, x, mask)                     # [B, H, n, n]
    rows = probs.sum(-1).gt(0.5).sum((0, 2)).double()             # valid rows per head
    assert torch.equal(profile.rows, rows)
    total = probs.sum(0) / rows[:, None, None]                     # [H, n, n], rows of mass 1
    close(profile.column_mass, total.sum(1))
    d = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    diagonal = torch.stack([total[:, d == offset].sum(-1) for offset in range(1 - n, n)], -1)
    close(profile.diagonal_mass, diagonal)
    block = 64                                                     # gcd of a100's 128 x 64
    blocks = math.ceil(n / block)
    padded = torch.nn.functional.pad(total, (0, blocks * block - n, 0, blocks * block - n))
    close(profile.block_mass, padded.view(4, blocks, block, blocks, block).sum((2, 4)))
    own_rows = probs.sum(-1).gt(0.5).sum(2).double().clamp(min=1)    # [B, H]: each input's valid rows
    own = torch.nn.functional.pad(probs, (0, blocks * block - n, 0, blocks * block - n))
    own = own.view(batch, 4, blocks, block, blocks, block).sum((3, 5)) / own_rows[..., None, None]
    close(profile.input_block_mass, own.transpose(0, 1))
    # The sampled rows alone (the rows a per-input estimate reads), unscaled.
    sampled = torch.zeros(n, dtype=torch.bool)
    sampled[spread_rows(block, SAMPLED_ROWS, n)] = True
    assert 0 < int(sampled.sum()) < n
    picked = torch.nn.functional.pad(probs * sampled[:, None], (0, blocks * block - n, 0, blocks * block - n))
    close(profile.input_sampled_mass, picked.view(batch, 4, blocks, block, blocks, block).sum((3, 5)).transpose(0, 1))
    bucket = offset_bucket(d.abs())
    by_bucket = torch.stack([(total * (bucket == b)).sum(1) for b in range(profile.column_offset_mass.shape[-1])], -1)
    close(profile.column_offset_mass, by_bucket)

    def diagonals(p):
        return torch.stack([p[..., d == offset].sum(-1) for offset in range(1 - n, n)], -1)

    # Each input's own line masses, and those of the queries vertical_slash's estimate reads.
    close(profile.input_column_mass, (probs.sum(2) / own_rows[..., None]).transpose(0, 1))
    close(profile.input_diagonal_mass, (diagonals(probs) / own_rows[..., None]).transpose(0, 1))
    estimating = torch.zeros(n, dtype=torch.bool)
    estimating[spread_queries(8, n)] = True
    chosen = probs * estimating[:, None]
    close(profile.input_estimated_columns, chosen.sum(2).transpose(0, 1))
    close(profile.input_estimated_diagonals, diagonals(chosen).transpose(0, 1))
    close(profile.column_mass.sum(-1), torch.ones(4, dtype=torch.float64))


def test_chunk_size_does_not_change_statistics():
    torch.manual_seed(0)
    model = MaskedAttention(causal=True).eval()
    x = torch.randn(2, 70, 24)
    results = [run_passes(model, (x,), [(x,)], [Calibrate(chunk_elements=chunk)]).attention_stats
               for chunk in (1 << 22, 200)]
    (name, small), = results[1].items()
    for field in ("column_mass", "diagonal_mass", "block_mass", "column_offset_mass", "rows"):
        close(getattr(results[0][name].profiles[(70, 70)], field),
                                   getattr(small.profiles[(70, 70)], field))


@pytest.mark.parametrize("mask_kind,expected", [("bool_causal", True), ("additive_causal", True),
                                                ("padding", False), (None, None)])
def test_mask_is_causal_detection(mask_kind, expected):
    torch.manual_seed(1)
    model = MaskedAttention(causal=False).eval()
    x = torch.randn(2, 20, 24)
    causal = torch.ones(20, 20, dtype=torch.bool).tril()
    mask = {"bool_causal": causal,
            "additive_causal": torch.zeros(20, 20).masked_fill(~causal, float("-inf")),
            "padding": padding_mask(2, 20, additive=False), None: None}[mask_kind]
    example = (x,) if mask is None else (x, mask)
    ctx = run_passes(model, example, [example], [Calibrate()])
    site = ctx.plan.attention[0]
    stats = ctx.attention_stats[site.name]
    assert stats.mask_is_causal is expected
    assert site.extra.get("mask_is_causal") is expected
    assert stats.causal is bool(expected)
    assert all(profile.causal is bool(expected) for profile in stats.profiles.values())


def test_calibration_lengths_get_separate_profiles():
    torch.manual_seed(2)
    model = MaskedAttention().eval()
    example = (torch.randn(2, 16, 24),)
    ctx = run_passes(model, example, [(torch.randn(1, 24, 24),), (torch.randn(2, 40, 24),),
                                      (torch.randn(1, 40, 24),)], [Calibrate()])
    stats = next(iter(ctx.attention_stats.values()))
    assert sorted(stats.profiles) == [(24, 24), (40, 40)] and stats.lengths == [24, 40]
    assert stats.profiles[(40, 40)].batches == 2
    assert ctx.pass_stats["calibrate"]["lengths"] == [[24, 24], [40, 40]]
    assert len(stats.head(3)) == 2 and stats.head(3)[0].column_mass.shape == (24,)


# -- planted heads --

PLANTED_LAYERS = [
    [("window", {"window": 16}), ("sink_window", {"sink": 2, "window": 16}),
     ("vertical_stripe", {"columns": list(range(40, 512, 48)), "window": 8}),    # every 48th key from 40
     ("multi_diagonal", {"period": 32, "width": 2}), ("block_topk", {"block": 64, "density": 0.3}),
     ("dense", {})],
    [("window", {"window": 48}), ("sink_window", {"sink": 1, "window": 8}),
     ("vertical_stripe", {"columns": [0, 1, 77, 177, 277, 377, 477], "window": 24}),    # 2 sinks + every 100th
     ("multi_diagonal", {"period": 50, "width": 3}), ("block_topk", {"block": 64, "density": 0.5}),
     ("window", {"window": 4})],
]


def _planted_mask(kind, params, n, causal):
    """The planted head's intended mask, in the pattern library's terms."""
    if kind == "block_topk":
        return None
    library = {key: ([value, 0] if isinstance(value, int) and key != "count" else value)
               for key, value in params.items()}
    if kind == "multi_diagonal":
        library["count"] = 0
    return get_pattern(kind).mask(library, n, n, causal)


@pytest.mark.parametrize("causal", [True, False])
def test_planted_heads_have_their_pattern(causal):
    model = PlantedAttention(PLANTED_LAYERS, causal=causal)
    for layer, probs in zip(PLANTED_LAYERS, planted_attention_probs(model, 384)):
        for (kind, params), head_probs in zip(layer, probs):
            mask = _planted_mask(kind, params, 384, causal)
            if kind == "dense":                        # uniform over the keys it may see
                allowed = torch.ones(384, 384).tril() if causal else torch.ones(384, 384)
                close(head_probs, (allowed / allowed.sum(-1, keepdim=True)).double())
            elif mask is not None:
                assert (head_probs * mask).sum() / 384 > 0.99, (kind, params)
            if kind in ("sink_window", "vertical_stripe"):
                columns = range(params["sink"]) if kind == "sink_window" else [c for c in params["columns"] if c < 384]
                special = head_probs[:, list(columns)].sum(1)[max(columns) + 1:].mean()
                assert 0.3 < special < 0.7            # the special keys hold about half the mass


def test_a_calibration_layout_is_a_candidate_at_a_causal_site_only_when_named():
    """By default a causal site never takes block_topk (its layout is the calibration text's
    content); a non-causal one does, and so does a causal one whose user names it."""
    torch.manual_seed(3)
    found = {}
    for causal, patterns in ((True, None), (False, None), (True, pattern_kinds())):
        model = PlantedAttention(PLANTED_LAYERS, causal=causal)
        ctx = run_passes(model, (torch.randn(2, 64, 32),), [(torch.randn(1, 512, 32),)],
                         [Calibrate(), ClassifyHeads()], target="h100", min_saving=0.0, patterns=patterns)
        found[causal, patterns is None] = [h.pattern for site in ctx.plan.attention for h in site.heads]
    assert "block_topk" not in found[True, True]
    assert "block_topk" in found[False, True] and "block_topk" in found[True, False]


@pytest.mark.parametrize("causal", [True, False])
def test_classification_recovers_planted_heads(causal):
    torch.manual_seed(3)
    model = PlantedAttention(PLANTED_LAYERS, causal=causal)
    # Pattern recovery, not speed: any pattern no slower than dense, on a GPU target. (On the
    # cpu target's measured costs block_topk heads of density 0.44-0.5 at N = 512 lose to SDPA.)
    # Every family named: at causal sites block_topk is a candidate only when asked for.
    ctx = run_passes(model, (torch.randn(2, 64, 32),), [(torch.randn(1, 512, 32),)],
                     [Calibrate(), ClassifyHeads()], target="h100", min_saving=0.0, patterns=pattern_kinds())
    planted = [kind for layer in PLANTED_LAYERS for kind, _ in layer]
    found = [head.pattern for site in ctx.plan.attention for head in site.heads]
    assert sum(p == f for p, f in zip(planted, found)) >= 0.95 * len(planted), list(zip(planted, found))
    stats = ctx.pass_stats["classify_heads"]
    assert stats["heads_classified"] == 12 and stats["sparse_heads"] == 11 and stats["window"] == 3
    for site in ctx.plan.attention:
        assert sorted(h for g in site.groups for h in g.heads) == list(range(6))
        assert all(instance_key(site.heads[h].pattern, site.heads[h].params) == instance_key(g.pattern, g.params)
                   for g in site.groups for h in g.heads)
        for head in site.heads:
            assert head.reason
            assert len(head.candidates) == len(pattern_kinds())
            assert all(0.0 <= c["recall"] <= 1.0 and 0.0 <= c["density"] <= 1.0 for c in head.candidates)
            if head.pattern != "dense":
                assert head.recall >= 0.95
                assert head.density == min(c["density"] for c in head.candidates
                                           if c["recall"] >= 0.95 and c["pattern"] == head.pattern)


def test_classification_options():
    torch.manual_seed(4)
    model = PlantedAttention(PLANTED_LAYERS[:1], causal=True)
    example, calibration = (torch.randn(2, 64, 32),), [(torch.randn(1, 256, 32),)]
    strict = run_passes(model, example, calibration, [Calibrate(), ClassifyHeads()], recall=0.999)
    assert strict.plan.recall_threshold == 0.999
    assert all(h.recall >= 0.999 for h in strict.plan.attention[0].heads)
    only_window = run_passes(model, example, calibration, [Calibrate(), ClassifyHeads()],
                             patterns=("window",))
    assert {h.pattern for h in only_window.plan.attention[0].heads} <= {"window", "dense"}
    no_gain = run_passes(model, example, calibration, [Calibrate(), ClassifyHeads()],
                         min_saving=0.9999)
    heads = no_gain.plan.attention[0].heads
    assert all(h.pattern == "dense" for h in heads) and "saves less" in heads[0].reason


def test_planted_llama_end_to_end():
    """capture -> canonicalize -> calibrate -> classify on the Llama-style example model."""
    plant = {layer: DEFAULT_PLANT[layer] for layer in (0, 1)}
    model = planted_llama(layers=2, plant=plant, attention="sparsec")
    ctx = run_passes(model, (planted_llama_inputs(2, 64),),
                     [(planted_llama_inputs(1, 1024, seed=seed),) for seed in (1, 2)],
                     [Calibrate(), ClassifyHeads()])
    assert len(ctx.plan.attention) == 2
    for layer, site in enumerate(ctx.plan.attention):
        assert (site.num_heads, site.num_kv_heads, site.head_dim) == (8, 2, 64)
        for head in site.heads:
            kind, window = plant[layer].get(head.head, ("dense", None))
            if kind == "vertical_stripe":
                # Its stripes are the SEP tokens: content, not position (they sit at the same
                # positions in every calibration input only by construction). Static columns
                # are positional rules (sinks, periods), so the head takes another pattern,
                # e.g. vertical_slash, which finds its columns per input.
                assert head.pattern != "vertical_stripe", (layer, head.head, head.params)
                continue
            assert head.pattern == kind, (layer, head.head, head.pattern, head.reason)
            if kind == "window":
                assert 0.5 * window <= head.params["window"][0] <= 1.1 * window
            if kind == "sink_window":
                assert head.params["sink"][0] == 1                 # BOS


@pytest.mark.parametrize("length", [1024, 4096])
def test_long_context_planted_llama_windows_do_not_depend_on_the_length(length):
    """The benchmark's model (``long_context=True``): a planted window is the same window
    whatever the calibration length (the Gaussian one recurs past ~4k tokens)."""
    plant = {0: {0: ("window", 16), 1: ("window", 64), 2: ("sink_window", 32)}}
    model = planted_llama(layers=1, plant=plant, attention="sparsec", long_context=True)
    ctx = run_passes(model, (planted_llama_inputs(1, 64),), [(planted_llama_inputs(1, length, seed=1),)],
                     [Calibrate(), ClassifyHeads()])
    heads = {head.head: head for head in ctx.plan.attention[0].heads}
    for index, (kind, window) in plant[0].items():
        assert heads[index].pattern == kind, (index, heads[index].pattern, heads[index].reason)
        assert 0.5 * window <= heads[index].params["window"][0] <= 1.2 * window, heads[index].params


@pytest.mark.parametrize("causal,window", [(True, None), (False, 9)])
def test_column_trimming_and_index_cache_keep_statistics_bitwise(monkeypatch, causal, window):
    """calibrate scatters only the key columns holding mass and reuses the statistics'
    positions across sites; both must leave every sum bit for bit as the full scatter."""
    from sparsec.passes import calibrate

    torch.manual_seed(window or 1)
    n, heads = 77, 6
    q, k = torch.randn(2, heads, n, 8) * 2, torch.randn(2, 3, n, 8)
    d = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    mask = None if window is None else ((d >= 0) & (d < window))

    class Site:
        name, num_heads = "site", heads

    def statistics():
        recorder = calibrate._Recorder({"a": Site(), "b": Site()}, 16, chunk_elements=300)
        for node in ("a", "b", "a"):
            recorder.record(node, q, k, mask, 0.3, causal)
        return recorder

    trimmed = statistics()
    assert trimmed.index_cache                                   # the second site reused positions
    monkeypatch.setattr(calibrate, "INDEX_CACHE_BYTES", 0)
    monkeypatch.setattr(calibrate, "_nonzero_columns", lambda probs: (0, probs.shape[-1]))
    full = statistics()
    assert not full.index_cache
    for node in ("a", "b"):
        for field in ("input_rows", "input_block_mass"):
            for got, want in zip(getattr(trimmed.sums[node][n, n], field), getattr(full.sums[node][n, n], field)):
                assert torch.equal(got, want)
        for field in ("column_mass", "diagonal_mass", "column_offset_mass"):
            assert torch.equal(getattr(trimmed.sums[node][n, n], field), getattr(full.sums[node][n, n], field))


@pytest.mark.parametrize("n_q, n_k", [(50, 37), (37, 50), (45, 45)])
def test_causal_statistics_match_brute_force_when_queries_and_keys_differ(n_q, n_k):
    """Causal rows are scattered up to their last diagonal without looking at the values;
    rows that see no key (n_q > n_k) hold no mass."""
    from sparsec.passes import calibrate
    from sparsec.patterns.base import offsets

    torch.manual_seed(n_q + n_k)
    q, k = torch.randn(2, 4, n_q, 8) * 2, torch.randn(2, 2, n_k, 8)

    class Site:
        name, num_heads = "site", 4

    recorder = calibrate._Recorder({"a": Site()}, 16, chunk_elements=300)
    recorder.record("a", q, k, None, 0.3, True)
    profile = recorder.sums["a"][n_q, n_k].profile(True)
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
    scores.masked_fill_(offsets(torch.arange(n_q), torch.arange(n_k), n_q, n_k) < 0, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    expected = calibrate.profile_from_probabilities(probs.sum(0) / 2, True, 16)
    assert torch.equal(profile.rows, expected.rows * 2)
    for field in ("block_mass", "column_mass", "diagonal_mass", "column_offset_mass"):
        torch.testing.assert_close(getattr(profile, field), getattr(expected, field), rtol=1e-5, atol=1e-7)


def test_compile_takes_the_families_it_is_given():
    """``compile(patterns=...)``: heads take only the named families (or dense), where the
    default plan of the same model takes others."""
    import sparsec
    torch.manual_seed(3)
    model = PlantedAttention(PLANTED_LAYERS, causal=True).eval()
    example, calibration = (torch.randn(1, 64, 32),), [(torch.randn(1, 512, 32),)]
    found = {}
    for patterns in (None, ["window"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = sparsec.compile(model, example, calibration=calibration, target="h100", patterns=patterns,
                                       seq_len=8192)
        found[patterns is None] = {h.pattern for site in compiled.plan.attention for h in site.heads}
    assert found[False] <= {"window", "dense"} and "window" in found[False]
    assert found[True] - {"window", "dense"}


def test_a_static_pattern_that_pays_goes_before_a_cheaper_dynamic_one(monkeypatch):
    """Priced at 8k without its estimate's measured time beyond its FLOPs, vertical_slash is
    a little cheaper than the planted stripe heads' own vertical_stripe fit: they take the
    static pattern (a dynamic family's recall is an estimate that keeps less at the serving
    length), and no head whose static candidates reach the recall and pay takes a dynamic one."""
    import dataclasses

    from sparsec.analysis import cost_model
    monkeypatch.setitem(cost_model.CALIBRATED, "h100",
                        dataclasses.replace(cost_model.CALIBRATED["h100"], dynamic_estimate_ps=0.0))
    torch.manual_seed(3)
    model = PlantedAttention(PLANTED_LAYERS, causal=True)
    ctx = run_passes(model, (torch.randn(2, 64, 32),), [(torch.randn(1, 512, 32),)], [Calibrate(), ClassifyHeads()],
                     target="h100", seq_len=8192)
    cheaper_dynamic = 0
    for site in ctx.plan.attention:
        for head in site.heads:
            dense = next(c for c in head.candidates if c["pattern"] == "dense")["seconds"]
            meeting = [c for c in head.candidates if c["recall"] >= 0.95 and c["pattern"] != "dense"]
            static = [c for c in meeting if not get_pattern(c["pattern"]).dynamic and c["seconds"] <= 0.8 * dense]
            if static:
                assert not get_pattern(head.pattern).dynamic, (site.name, head.head, head.pattern)
                cheaper_dynamic += min(c["seconds"] for c in meeting) < min(c["seconds"] for c in static)
    assert cheaper_dynamic >= 2
    stripes = [site.heads[2].pattern for site in ctx.plan.attention]
    assert stripes == ["vertical_stripe", "vertical_stripe"]


def test_vertical_slash_recall_counts_what_its_estimating_queries_miss():
    """The estimating queries (the odd rows of 128) attend key 10, the other rows key 20, more
    heavily: each input's estimate keeps key 10, so the recall of the sink, one more column
    and the diagonal is what those hold over every row, below what key 20 would (where the
    fit ranked columns by every row's mass, it counted key 20: 0.67 for 0.62)."""
    from sparsec.passes import calibrate
    n = 128
    probs = torch.zeros(1, n, n, dtype=torch.float64)
    for row in range(n):
        column, weight = (row, 0.0) if row < 21 else (10, 0.8) if row % 2 else (20, 0.9)
        probs[0, row, column] += weight
        probs[0, row, row] += 1 - weight
    profile = calibrate.profile_from_probabilities(probs, True, 16).head(0)

    def kept_by(column):
        kept = torch.eye(n, dtype=torch.bool)
        kept[:, [0, column]] = True
        return float((probs[0] * kept).sum() / n)

    recall = get_pattern("vertical_slash").recall(profile, {"vertical": [2, 0], "slash": [1, 0], "queries": 64})
    assert recall == pytest.approx(kept_by(10), abs=1e-6)
    assert recall < kept_by(20) - 0.03
