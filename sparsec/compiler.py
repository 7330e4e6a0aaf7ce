"""``sparsec.compile``: capture a model, run the passes, return a ``CompiledModel``."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils import _pytree as pytree

from sparsec.ir import config
from sparsec.passes.infra.dump import DumpWriter
from sparsec.ir.errors import InvalidArgumentError, UnservableInputError, UnsupportedDtypeError
from sparsec.ir.inputs import as_call, calibration_calls, leaf_signature, relative_l2
from sparsec.ir.tolerance import Tolerance, logits_of, resolve_tolerance, top1_agreement
from sparsec.passes.infra.pass_manager import CompileContext, PassManager
from sparsec.ir.plan import CostRecord, Plan
from sparsec.ir.targets import Target, get_target, running_for
from sparsec.runtime.fast_graph import fast_graph


def default_passes(verify=None) -> list:
    """The pass pipeline, in order (capture runs before it, outside the pass manager);
    ``verify`` (a :class:`~sparsec.passes.verify.Verify`) runs after classification."""
    from sparsec.passes.calibrate import Calibrate
    from sparsec.passes.canonicalize import Canonicalize
    from sparsec.passes.classify_heads import ClassifyHeads
    from sparsec.passes.fold_causal_mask import FoldCausalMask
    from sparsec.passes.fuse_heads import FuseHeads
    from sparsec.passes.lower import Lower
    from sparsec.passes.sparsify_weights import SparsifyWeights

    # sparsify_weights does nothing unless weight sparsity is asked for; it runs after
    # fuse_heads, whose head walk does not go through sparse_linear.
    decide = [Canonicalize(), Calibrate(), FoldCausalMask(), ClassifyHeads()]
    return [*decide, *([verify] if verify else []), FuseHeads(), SparsifyWeights(), Lower()]


def recall_passes(verify=None) -> list:
    """The default pipeline with heads of near-equal patterns merged into fewer launches
    after classification (the search does its own launch accounting)."""
    from sparsec.passes.merge_head_groups import MergeHeadGroups

    *decide, fuse, sparsify, lower = default_passes()
    return [*decide, MergeHeadGroups(), *([verify] if verify else []), fuse, sparsify, lower]


def budget_passes(budget, verify=None) -> list:
    """The pipeline with the layerwise sparsity search under ``budget`` after classification
    (it decides linear levels too when weight sparsity is asked for; sparsify_weights applies them)."""
    from sparsec.passes.search import Search

    *front, fuse, sparsify, lower = default_passes()
    return [*front, Search(budget), *([verify] if verify else []), fuse, sparsify, lower]


def plan_passes(plan: Plan, verify=None) -> list:
    """The pipeline that applies a given plan instead of calibrating and classifying."""
    from sparsec.passes.apply_plan import ApplyPlan
    from sparsec.passes.canonicalize import Canonicalize
    from sparsec.passes.fuse_heads import FuseHeads
    from sparsec.passes.lower import Lower
    from sparsec.passes.sparsify_weights import SparsifyWeights

    return [Canonicalize(), ApplyPlan(plan), *([verify] if verify else []), FuseHeads(), SparsifyWeights(), Lower()]


def _pipeline(plan: Plan | None, budget: Any, limit: Tolerance, enforce: bool) -> list:
    """The passes for a given plan, a budget, or classification by recall; all verified
    against ``limit`` (densifying to fit it where ``enforce``)."""
    from sparsec.passes.verify import Verify

    verify = Verify(limit, enforce=enforce and plan is None)
    if plan is not None:
        return plan_passes(plan, verify)
    return budget_passes(budget, verify) if budget is not None else recall_passes(verify)


def _check_against_original(plan: Plan, limit: Tolerance, original: Any, compiled: Any) -> None:
    """The compiled model's error on the example input against the original model's output,
    under the verified tolerance (above the noise floor verification measured), recorded in
    ``plan.error`` with its relative L2; a warning where it fails although verification held
    (or never ran): what verification measured is the canonical graph before head fusion and
    lowering, so this is the one check of the model as it is returned."""
    record = plan.verification
    rel_l2 = relative_l2(original, compiled)
    error = rel_l2 if limit.metric == "rel_l2" else limit.measure(original, compiled)
    plan.error["rel_l2_vs_dense_on_example"] = rel_l2
    plan.error[f"{limit.metric_name}_vs_dense_on_example"] = error
    top1 = top1_agreement(original, compiled) if logits_of(original) is not None else None
    if top1 is not None:
        plan.error["top1_vs_dense_on_example"] = top1
    floor, floor_top1 = (record.noise_floor, record.noise_floor_top1) if record else (None, None)
    above_floor = max(0.0, error - (floor or 0.0)), None if top1 is None else min(1.0, top1 + 1.0 - (floor_top1 or 1.0))
    if limit.holds(*above_floor) or (record is not None and not record.within_tolerance):
        return                                  # within, or verification has already said so
    agreement = "" if top1 is None else f", top-1 agreement {top1:.3f}"
    why = ("no verification ran (a pass list without sparsec.passes.verify.Verify): add it, or make heads "
           "denser" if record is None else
           f"verification measured {record.measured:.3g} on the canonical graph, so a pass after it (head "
           "fusion, lowering) or the compiled kernels changed the model: find the pass with `sparsec "
           "bisect`, or compile with disable_passes=[...]")
    warnings.warn(f"sparsec: the compiled model's {limit.metric_name} against the original model on the "
                  f"example input is {error:.3g}{agreement}, over the tolerance {limit.describe()}; {why}",
                  stacklevel=3)


def _cost_record(plan: Plan, target: Target, seq_len: int | None) -> CostRecord | None:
    """The cost model's predicted attention speedup of the final plan, at the serving length
    (``seq_len``, ``Budget.seq_len``) or the longest verified length."""
    from sparsec.analysis.cost_model import CostModel

    lengths = (plan.verification.lengths if plan.verification else None) or [0]
    n = seq_len or max(lengths)
    return CostRecord.from_dict(CostModel(target).attention_record(plan.attention, n)) if n else None


def _own_tensors(graph_module: torch.fx.GraphModule) -> None:
    """Give ``graph_module`` private copies of its parameters, buffers and tensor constants.

    torch.export shares the captured parameters with the user's model, while fuse_heads
    holds permuted copies and canonicalize folds a learned temperature into a constant: a
    later ``load_state_dict`` or optimizer step on the original would reach some tensors
    of the compiled model and not others. One rule instead: the
    compiled model owns copies of everything, frozen at compile time. Tensors shared
    inside the graph module (tied weights) stay shared with each other."""
    copies: dict[int, torch.Tensor] = {}

    def own(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in copies:
            data = tensor.detach().clone()
            copies[id(tensor)] = (torch.nn.Parameter(data, requires_grad=tensor.requires_grad)
                                  if isinstance(tensor, torch.nn.Parameter) else data)
        return copies[id(tensor)]

    for module in graph_module.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is not None:
                    table[name] = own(tensor)
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor):                 # get_attr tensor constants
                setattr(module, name, own(value))


def _check_model(model: torch.nn.Module) -> None:
    """Refuse a model whose weights are on the meta device (no data to run or measure)."""
    on_meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()]
               if tensor.device.type == "meta"]
    if on_meta:
        raise InvalidArgumentError(
            f"the model has {len(on_meta)} parameter(s)/buffer(s) on the meta device (e.g. {on_meta[0]}), "
            "which hold shapes but no data; load real weights first (model.to_empty(device='cpu') then "
            "load_state_dict, or from_pretrained without a meta device_map), since sparsec runs the model")


@contextlib.contextmanager
def _input_dtype_errors(example: tuple[tuple, dict]):
    """Name the fix when the model fails because an integer input meets float weights
    (``mat1 and mat2 must have the same dtype``) instead of letting torch's message stand."""
    try:
        yield
    except RuntimeError as error:
        text = str(error)
        integer = [f"{('positional', 'keyword')[path[0].idx]} input {pytree.keystr(path[1:])} ({leaf.dtype})"
                   for path, leaf in pytree.tree_flatten_with_path(example)[0]
                   if isinstance(leaf, torch.Tensor) and not leaf.is_floating_point() and not leaf.is_complex()]
        if integer and ("dtype" in text or "scalar type" in text or "not implemented for" in text):
            raise UnsupportedDtypeError(
                f"the model failed on integer example inputs: {', '.join(integer)} ({text.splitlines()[0]}); "
                "pass floating-point tensors (e.g. x.float()) for inputs the model computes with, and "
                "integer tensors only for token ids, positions and masks") from error
        raise


def _fixed_sizes(graph_module: torch.fx.GraphModule) -> list[list] | None:
    """Per tensor input of the graph, its sizes: an int where the graph fixed the dimension,
    None where it is symbolic; None when the placeholders carry no shapes."""
    sizes = []
    for node in graph_module.graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("val")
        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            sizes.append([int(size) if is_concrete_int(size) else None for size in value.shape])
    return sizes


class CompiledModel:
    """A compiled model: call it like the original; ``.plan`` says what was made sparse.

    It owns copies of every parameter, buffer and constant it runs (taken when it is
    built): changing the original model afterwards (``load_state_dict``, an optimizer
    step) never changes the compiled model; recompile to pick up new weights."""

    def __init__(self, graph_module: torch.fx.GraphModule, plan: Plan, example_args: tuple,
                 example_kwargs: dict, attention_stats: dict | None = None):
        _own_tensors(graph_module)
        self.graph_module = graph_module
        # What a call runs: the same graph and tensors, with less host time per node.
        self._runner = fast_graph(graph_module)
        self.plan = plan
        # Calibration statistics per site (not saved in artifacts): what reports draw.
        self.attention_stats = attention_stats or {}
        self.example_args = example_args
        self.example_kwargs = example_kwargs
        self._target = get_target(plan.target)
        self._signature = leaf_signature(example_args, example_kwargs)
        self._example_tensors = [t for t in pytree.tree_leaves((example_args, example_kwargs))
                                 if isinstance(t, torch.Tensor)]
        self._fixed_sizes = _fixed_sizes(graph_module)
        self._warned_reference = False

    def _check(self, args: tuple, kwargs: dict) -> None:
        spec, signature = leaf_signature(args, kwargs)
        if spec != self._signature[0]:
            raise UnservableInputError(
                f"inputs have structure {spec}, but the model was compiled for {self._signature[0]}; "
                "call it with the same positional / keyword arguments as example_inputs")
        if signature != self._signature[1]:
            raise UnservableInputError(
                f"input tensor ranks/dtypes {signature} differ from the compiled {self._signature[1]}; "
                "cast the inputs, or recompile with example inputs of this dtype")
        self._check_fixed_sizes(args, kwargs)
        if not self.plan.capture.get("dynamic", True):
            expected = [t.shape for t in self._example_tensors]
            got = [t.shape for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if expected != got:
                raise UnservableInputError(
                    f"this model was captured with static shapes {expected} (dynamic export failed: "
                    f"{self.plan.capture.get('reason', '')}); got {got}. Pad or crop inputs to the "
                    "compiled shape, or make the model exportable with dynamic shapes")

    def _check_fixed_sizes(self, args: tuple, kwargs: dict) -> None:
        """A dimension the graph fixed (a hidden size, or one whose example size was 1) must
        match; say which, rather than torch's "Guard failed"."""
        leaves = [(path, leaf) for path, leaf in pytree.tree_flatten_with_path((args, kwargs))[0]
                  if isinstance(leaf, torch.Tensor)]
        examples = self._example_tensors
        if self._fixed_sizes is None or len(leaves) != len(self._fixed_sizes) or len(examples) != len(leaves):
            return
        for (path, leaf), fixed, example in zip(leaves, self._fixed_sizes, examples):
            for dim, (size, compiled) in enumerate(zip(leaf.shape, fixed)):
                if compiled is None or size == compiled:
                    continue
                name = f"{('positional', 'keyword')[path[0].idx]} input {pytree.keystr(path[1:])}"
                if example.dim() > dim and example.shape[dim] == 1:
                    raise UnservableInputError(
                        f"{name} has size {size} on dimension {dim}, but its example size was 1 and "
                        "torch.export fixed it; recompile with example inputs whose batch and sequence "
                        "sizes are at least 2, or call with size 1 there")
                raise UnservableInputError(
                    f"{name} has size {size} on dimension {dim}, but the model was compiled for a fixed "
                    f"size {compiled} there (a model dimension such as the hidden size or channels, not "
                    f"the batch or sequence length); pass inputs of size {compiled} on dimension {dim}")

    def _warn_if_reference(self, args: tuple, kwargs: dict) -> None:
        if self._warned_reference or self._target.device_type != "cuda":
            return
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if tensors and not any(t.is_cuda for t in tensors):
            warnings.warn(f"sparsec: compiled for {self._target.name} but running on CPU through the "
                          "pure-torch reference kernels (correct, not fast)", stacklevel=3)
            self._warned_reference = True

    def __call__(self, *args, **kwargs) -> Any:
        self._check(args, kwargs)
        self._warn_if_reference(args, kwargs)
        try:
            with running_for(self._target):          # the run-time kernels take its kernel configs
                return self._runner(*args, **kwargs)
        except (RuntimeError, AssertionError, ValueError) as error:
            if "Guard failed" in str(error) or "Expected input" in str(error):
                raise UnservableInputError(
                    f"the compiled graph cannot serve this input: {error}. torch.export fixes every "
                    "dimension whose example size was 1 and constrains the others (plan.capture['ranges']); "
                    "recompile with example inputs whose batch and sequence sizes are at least 2") from error
            raise

    def report(self, path: "str | Path") -> Path:
        """Write a self-contained HTML report of the plan, with per-head heatmaps."""
        from sparsec.tools.report import write_report

        return write_report(self.plan, self.attention_stats, path)

    def export_onnx(self, path: "str | Path", mode: str = "custom", opset: int | None = None,
                    dynamic_length: bool = True) -> Path:
        """Export to ONNX: ``custom`` keeps sparse attention as ``ai.sparsec`` ops (run with
        ``sparsec.runtime.ort_session``), ``decomposed`` uses standard ONNX ops only."""
        from sparsec.codegen.onnx import export_onnx

        return export_onnx(self.graph_module, self.example_args, self.example_kwargs, self.plan, path,
                           mode=mode, opset=opset, dynamic_length=dynamic_length)

    def save(self, directory: "str | Path") -> Path:
        """Save the program, plan and kernel sources; ``sparsec.load(directory)`` restores it.

        The directory is replaced atomically under a lock (a failed save leaves the previous
        artifact intact); a non-empty directory that is not a sparsec artifact is refused.
        For GPU targets ``kernels/`` holds the generated Triton source of every sparse head
        group (generated without a GPU), each listed in the manifest.
        """
        from sparsec.passes.helpers.capture import export_program
        from sparsec.runtime.artifact import write_artifact

        program = export_program(self.graph_module, self.example_args, self.example_kwargs,
                                 dynamic=self.plan.capture.get("dynamic", True))
        return write_artifact(directory, program, self.plan.to_json(), extra_files=self._kernel_sources(),
                              example_inputs=(self.example_args, self.example_kwargs))

    def _kernel_sources(self) -> dict[str, str]:
        """``kernels/<file>.py`` → source for each sparse group of the plan (GPU targets)."""
        from sparsec.codegen.triton.generator import site_kernels

        if self._target.device_type != "cuda":
            return {}
        dtype = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(self._model_dtype(), "bfloat16")
        return {f"kernels/{kernel.filename}": kernel.source
                for site in self.plan.attention for kernel in site_kernels(site, self._target, dtype)}

    def _model_dtype(self) -> torch.dtype | None:
        for tensor in self.graph_module.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
        return None

    def __repr__(self) -> str:
        sparse = sum(not h.is_dense for s in self.plan.attention for h in s.heads)
        total = sum(len(s.heads) for s in self.plan.attention)
        linears = sum(entry.level > 0 for entry in self.plan.linears)
        return (f"CompiledModel(target={self.plan.target}, attention sites={len(self.plan.attention)}, "
                f"sparse heads={sparse}/{total}, sparse linears={linears}/{len(self.plan.linears)})")


def compile(model: torch.nn.Module, example_inputs: Any, *, calibration: Iterable | None = None,
            target: "str | Target" = "cpu", budget: Any = None, weights: Any = None, recall: float = 0.95,
            patterns: Iterable[str] | None = None, tolerance: Any = "auto", verification: Iterable | None = None,
            seq_len: int | None = None, dump_dir: "str | Path | None" = None, plan: Plan | None = None,
            passes: list | None = None, disable_passes: Iterable[str] = (),
            instruments: Iterable = ()) -> CompiledModel:
    """Compile ``model`` into a sparse model.

    Args:
        model: the ``nn.Module`` to compile (captured in eval mode; its own mode is
            restored). The compiled model owns copies of the model's parameters and buffers,
            taken at compile time: later changes to ``model`` (``load_state_dict``, optimizer
            steps) do not reach it; compile again to pick them up.
        example_inputs: a tuple of positional args, or a dict of keyword args
            (HF models: ``{"input_ids": ..., "attention_mask": ...}``).
        calibration: an iterable of inputs built like ``example_inputs``; defaults to it.
        target: ``"cpu"``, ``"a100"``, ``"h100"``, ``"h200"`` or a :class:`Target`.
        budget: a :class:`sparsec.Budget` (error, speedup or density) for the layerwise
            sparsity search; ``None`` classifies each head by ``recall`` alone.
        weights: a :class:`sparsec.WeightSparsity` to prune the linears too (the LM head /
            classifier stays dense by default). Without a budget, levels reach its global
            ``sparsity`` (OWL allocation); with an error or speedup budget the search
            chooses them in one knapsack with the attention levels.
        recall: the fraction of attention mass a head's pattern must keep on calibration data.
        patterns: the pattern families a head may take (e.g. ``["sink_window",
            "dynamic_blocks"]``; dense is always one); default every family, except at causal
            sites those whose layout is taken from the calibration text (``block_topk``).
        tolerance: how far the compiled model may drift from the dense one on the
            verification inputs before compile makes the worst heads dense again
            (:mod:`sparsec.ir.tolerance`): ``"auto"`` (KL <= 0.02 and top-1 agreement >= 0.98
            for language models, relative L2 <= 0.05 otherwise; an error budget's own limit),
            a number (the default metric's limit), a :class:`sparsec.Tolerance`, or ``None``
            (measure and warn, never densify). A given ``plan`` is measured, not changed.
        verification: inputs built like ``example_inputs`` to verify on (e.g. held-out text,
            or inputs at the serving length); defaults to the calibration inputs.
        seq_len: the serving length: patterns are chosen, and head groups merged, by the
            cost model's time there (default ``Budget.seq_len``, else the longest
            calibration length). Short calibration with a long ``seq_len`` keeps patterns
            that only pay off at length.
        dump_dir: write pass dumps here (or set ``SPARSEC_DUMP``).
        plan: reuse this plan's head patterns (e.g. an edited one) instead of calibrating.
        passes: override the pass pipeline (advanced; defaults to :func:`default_passes`).
        disable_passes: names of pipeline passes to skip (e.g. ``["merge_head_groups"]``),
            with those of ``SPARSEC_DISABLE_PASSES``; an unknown name raises ``ValueError``.
            ``plan.extra["disabled_passes"]`` lists the skipped ones.
        instruments: :class:`~sparsec.passes.infra.pass_manager.PassInstrument` objects the
            pass manager calls around every pass (e.g. a ``PassTimer`` for per-pass seconds).
    """
    from sparsec.ir.inputs import check_finite, check_patterns, check_recall
    from sparsec.passes.helpers.capture import capture, capture_mode

    recall = check_recall(recall)
    patterns = check_patterns(patterns)
    target = get_target(target)
    example = as_call(example_inputs)
    check_finite([example], "example_inputs")
    calls = calibration_calls(calibration, example)
    if calibration is not None:
        check_finite(calls, "calibration batch")
    _check_model(model)
    # Eval mode and no KV cache while capturing and running the reference; the user's
    # mode and config come back afterwards (passes/capture.py, capture_mode).
    with _input_dtype_errors(example), capture_mode(model):
        gm, capture_record = capture(model, *example)
        with torch.no_grad():
            dense_reference = model(*example[0], **example[1])
    new_plan = Plan(target=target.name, recall_threshold=recall, capture=capture_record)
    if weights is not None and budget is not None and weights.levels is not None:
        raise ValueError("WeightSparsity(levels=...) fixes every linear's level, and a budget searches "
                         "them: pass one of the two")
    ctx = CompileContext(plan=new_plan, target=target, example_args=example[0], example_kwargs=example[1],
                         calibration=calls, recall=recall, patterns=patterns, budget=budget, weights=weights,
                         weight_levels=None if weights is None or weights.levels is None else dict(weights.levels))
    dump_path = dump_dir or config.dump_dir()
    limit, enforce = resolve_tolerance(tolerance, dense_reference, budget)
    if passes is None:
        passes = _pipeline(plan, budget, limit, enforce)
    if verification is not None:
        ctx.verification = calibration_calls(verification, example)
    ctx.seq_len = seq_len or getattr(budget, "seq_len", None)
    manager = PassManager(passes, DumpWriter(dump_path) if dump_path else None, disabled=tuple(disable_passes),
                          instruments=tuple(instruments))
    gm = manager.run(gm, ctx)
    with torch.no_grad(), running_for(target):       # the compiled model's own kernels and configs
        compiled_output = gm(*example[0], **example[1])
    _check_against_original(new_plan, limit, dense_reference, compiled_output)
    new_plan.cost = _cost_record(new_plan, target, ctx.seq_len)
    compiled = CompiledModel(gm, new_plan, example[0], example[1], ctx.attention_stats)
    if manager.dump:
        manager.dump.write_plan(new_plan)
        compiled.report(manager.dump.directory / "report.html")
    return compiled


def load(directory: "str | Path") -> CompiledModel:
    """Load a model saved with :meth:`CompiledModel.save`, without its original class.

    Nothing in the directory is executed or unpickled (see the README, "Trust model of
    sparsec.load"); a damaged, mixed or unsafe artifact raises a typed
    :class:`~sparsec.ir.errors.ArtifactError`.
    """
    from sparsec.runtime.artifact import read_artifact

    program, plan_json, _manifest = read_artifact(directory)
    plan = Plan.from_json(plan_json)
    args, kwargs = program.example_inputs or ((), {})
    return CompiledModel(program.module(), plan, tuple(args), dict(kwargs))
