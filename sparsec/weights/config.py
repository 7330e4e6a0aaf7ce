"""``sparsec.WeightSparsity``: what ``sparsec.compile(weights=...)`` prunes, and how.

    cm = sparsec.compile(model, (ids,), calibration=batches, weights=sparsec.WeightSparsity("2:4"))
    cm = sparsec.compile(model, (ids,), calibration=batches, target="h100",
                         budget=sparsec.Budget(max_error=0.02, seq_len=16384),
                         weights=sparsec.WeightSparsity("2:4"))

Without a budget every eligible linear is pruned for the global ``sparsity`` (OWL spreads
the levels for unstructured and block weights; N:M levels are uniform). With an error or
speedup budget the layerwise search chooses each linear's level in the same knapsack as
the attention levels, and ``sparsity`` is not used; a density budget caps attention only, so
the linears then take the global ``sparsity`` as without a budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sparsec.weights.scores import COMPARISON_GROUP
from sparsec.weights.structures import parse_structure

# The LM head / classifier stays dense unless the user says otherwise (``exclude=()``).
DEFAULT_EXCLUDE = ("lm_head", "classifier", "score", "qa_outputs", "head")


@dataclass(frozen=True)
class WeightSparsity:
    """Weight sparsity of the model's linears.

    Args:
        structure: ``"2:4"``, ``"4:8"`` (any ``N:M``), ``"unstructured"``, ``"block32"`` or
            ``"block64"``.
        sparsity: fraction of the eligible weights to prune when no budget decides the levels;
            0 turns weight sparsity off (with or without a budget).
        score: ``"wanda"`` (``|W| * ||X||`` per output row, needs calibration inputs) or
            ``"magnitude"`` (``|W|`` over the layer).
        exclude: module-path globs of linears that stay dense (default: the LM head /
            classifier names in :data:`DEFAULT_EXCLUDE`).
        levels: ``{module path: level}`` fixing each linear's level (others stay dense);
            not combined with a budget, which chooses the levels itself.

    Tuning of the ``sparsify_weights`` pass (defaults suit most models):

    Args:
        allocation: ``"owl"`` or ``"uniform"`` levels for the global ``sparsity`` (None: OWL
            for unstructured and block structures, uniform for N:M).
        owl_lambda: OWL's spread of levels around the target (0.08).
        owl_threshold: OWL's outlier threshold, in multiples of the mean score (5.0).
        calibration_rows: input rows sampled per linear to measure candidate errors (512).
        measure_each: one extra forward per pruned linear to measure its own contribution
            to the output error.
        candidate_model_error: one forward per candidate level and linear to add each
            candidate's error of the whole model's outputs (the unit attention sensitivities use).
    """

    structure: str = "2:4"
    sparsity: float = 0.5
    score: str = "wanda"
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    levels: dict | None = field(default=None, hash=False)
    allocation: str | None = None
    owl_lambda: float = 0.08
    owl_threshold: float = 5.0
    calibration_rows: int = 512
    measure_each: bool = True
    candidate_model_error: bool = False

    def __post_init__(self):
        parsed = parse_structure(self.structure)
        object.__setattr__(self, "structure", str(parsed))
        if isinstance(self.exclude, str):
            raise ValueError(f"exclude takes a sequence of module-path globs, e.g. ({self.exclude!r},)")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if not 0 <= self.sparsity <= parsed.max_level:
            raise ValueError(f"sparsity must be in [0, {parsed.max_level}] for {parsed}, got {self.sparsity}")
        if self.score not in COMPARISON_GROUP:
            raise ValueError(f"unknown score {self.score!r}; use one of {sorted(COMPARISON_GROUP)}")
        if self.levels is not None and not all(0 <= level <= parsed.max_level for level in self.levels.values()):
            raise ValueError(f"levels must be in [0, {parsed.max_level}] for {parsed}, got {self.levels}")
        if self.allocation not in (None, "owl", "uniform"):
            raise ValueError(f"allocation must be 'owl', 'uniform' or None, got {self.allocation!r}")

    def to_dict(self) -> dict:
        return {"structure": self.structure, "sparsity": self.sparsity, "score": self.score,
                "exclude": list(self.exclude), "levels": self.levels}
