"""vertical_stripe keeps positional columns only: sink prefixes and periodic keys.

Stripes that follow content (a separator, a name: different keys in every input) cannot be
written as absolute columns; such a head must fail vertical_stripe's recall at calibration
and take another pattern, while a positional head (sinks + every p-th key) keeps it.
"""
import math

import pytest
import torch

from sparsec.analysis.cost_model import CostModel
from sparsec.passes.calibrate import profile_from_probabilities
from sparsec.passes.classify_heads import classify_head
from sparsec.patterns import get_pattern, pattern_kinds
from sparsec.patterns.vertical_stripe import MAX_STRIPES, positional_columns
from sparsec.ir.plan import HeadPlan
from sparsec.ir.targets import get_target

WINDOW = 8


def _stripe_probs(n: int, columns: list[int], causal: bool, generator: torch.Generator) -> torch.Tensor:
    """``[n, n]`` probabilities of one input: a local window of WINDOW keys and the stripe
    ``columns`` holding about half of each row's mass, with random jitter."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    d = i - j
    scores = torch.full((n, n), float("-inf"), dtype=torch.float64)
    scores[d.abs() < WINDOW] = 0.0
    inside = [c for c in columns if c < n]
    stripe = torch.zeros(n, dtype=torch.bool)
    stripe[inside] = True
    scores[:, stripe] = math.log(WINDOW / max(1, len(inside)))
    scores = scores + 0.3 * torch.randn(n, n, generator=generator, dtype=torch.float64)
    if causal:
        scores = scores.masked_fill(d < 0, float("-inf"))
    return torch.softmax(scores, -1)


def _profiles(batches_per_length: dict[int, list[list[int]]], causal: bool, seed: int = 0) -> list:
    """One head's profiles, shortest first: each length's batches averaged (as calibrate sums them)."""
    generator = torch.Generator().manual_seed(seed)
    profiles = []
    for n, batches in sorted(batches_per_length.items()):
        probs = torch.stack([_stripe_probs(n, columns, causal, generator) for columns in batches]).mean(0)
        profiles.append(profile_from_probabilities(probs[None], causal, 16).head(0))
    return profiles


def _classify(profiles, causal: bool, recall: float = 0.95, families=None) -> HeadPlan:
    head = HeadPlan(head=0)
    classify_head(head, profiles, causal, 64, recall, 0.2, CostModel(get_target("h100")), families)
    return head


@pytest.mark.parametrize("causal", [True, False])
def test_content_dependent_stripes_are_not_vertical_stripe(causal):
    """Six stripe keys, different in every calibration input (content): their absolute
    positions must not become the head's static columns."""
    generator = torch.Generator().manual_seed(1)
    batches = {n: [sorted((torch.randperm(n - 16, generator=generator)[:6] + 16).tolist()) for _ in range(4)]
               for n in (256, 512)}
    head = _classify(_profiles(batches, causal), causal)
    assert head.pattern != "vertical_stripe", (head.params, head.reason)
    stripe = next(c for c in head.candidates if c["pattern"] == "vertical_stripe")
    content = {c for columns in batches[512] for c in columns}
    assert len(content & set(stripe["params"]["columns"])) <= len(content) // 4, stripe["params"]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sink,period,phase", [(2, 40, 17), (0, 24, 10), (1, 64, 30)])
def test_positional_stripes_stay_vertical_stripe(sink, period, phase, causal):
    """Sinks plus every p-th key, the same in every input and at both lengths: among the
    static patterns the head is vertical_stripe with exactly that rule (at recall 0.99,
    where every stripe is needed; the dynamic vertical_slash is left out, as it may be
    cheaper by its estimate)."""
    columns = positional_columns(sink, period, phase)
    batches = {n: [columns, columns] for n in (320, 640)}
    static = tuple(kind for kind in pattern_kinds() if not get_pattern(kind).dynamic)
    head = _classify(_profiles(batches, causal, seed=2), causal, recall=0.99, families=static)
    assert head.pattern == "vertical_stripe", head.reason
    assert head.params["columns"] == columns
    assert head.recall >= 0.99


def test_positional_columns_rule():
    assert positional_columns(3, 0, 0) == [0, 1, 2]
    assert positional_columns(2, 10, 5)[:5] == [0, 1, 5, 15, 25]
    assert len(positional_columns(2, 10, 5)) == MAX_STRIPES
    assert positional_columns(4, 3, 1)[:6] == [0, 1, 2, 3, 4, 7]      # sinks and periodic keys overlap


def test_fit_never_keeps_arbitrary_columns():
    """A single input whose stripes are at arbitrary positions (here 3 keys): whatever the
    fit returns, its columns are a sink prefix plus one arithmetic progression."""
    profiles = _profiles({400: [[37, 150, 333]]}, True, seed=3)
    params, _recall = get_pattern("vertical_stripe").fit(profiles, 0.95)
    columns = params["columns"]
    sinks = next((k for k in range(len(columns) + 1) if k == len(columns) or columns[k] != k), 0)
    rest = columns[sinks:]
    assert len({b - a for a, b in zip(rest, rest[1:])}) <= 1, columns
    assert not {37, 150} <= set(columns)          # what a fit of absolute positions keeps
