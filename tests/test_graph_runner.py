"""The one graph interpreter (sparsec.analysis.graph_runner): input flattening with keyword
arguments, observe / replace hooks and suffix runs from a prefix cache, against eager torch."""
from __future__ import annotations

import pytest
import torch

from sparsec.analysis.graph_runner import GraphRunner, flatten_inputs, replace_argument
from sparsec.passes.helpers.capture import capture

LINEAR = torch.ops.aten.linear.default


class _Scaled(torch.nn.Module):
    """Three linears with keyword-only inputs that change the output."""

    def __init__(self, width: int = 11):
        super().__init__()
        self.first, self.second, self.third = (torch.nn.Linear(width, width) for _ in range(3))

    def forward(self, x, scale=None, shift=None):
        h = torch.tanh(self.first(x)) * scale
        h = torch.tanh(self.second(h)) + shift
        return {"out": self.third(h + x), "hidden": h}


def _call(seed: int = 0, batch: int = 3, length: int = 7, width: int = 11):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, width, generator=generator)
    return (x,), {"shift": torch.randn(width, generator=generator), "scale": torch.rand(width, generator=generator) + 0.5}


def _graphs(model):
    args, kwargs = _call()
    exported, _ = capture(model, args, kwargs)
    return {"export": exported, "symbolic_trace": torch.fx.symbolic_trace(model)}


@pytest.mark.parametrize("kind", ["export", "symbolic_trace"])
def test_run_matches_eager_with_keyword_arguments(kind):
    torch.manual_seed(0)
    model = _Scaled().eval()
    gm = _graphs(model)[kind]
    args, kwargs = _call(seed=4, batch=2, length=13)          # another length than captured
    with torch.no_grad():
        expected = model(*args, **kwargs)
    output = GraphRunner(gm).run(args, kwargs)
    torch.testing.assert_close(output["out"], expected["out"])
    torch.testing.assert_close(output["hidden"], expected["hidden"])


def test_flatten_binds_keyword_arguments_by_name_without_an_input_spec():
    gm = torch.fx.symbolic_trace(_Scaled())
    args, kwargs = _call()
    flat = flatten_inputs(gm, args, kwargs)        # kwargs given as shift, scale: bound by name
    assert flat[0] is args[0] and flat[1] is kwargs["scale"] and flat[2] is kwargs["shift"]
    with pytest.raises(TypeError, match="no inputs named"):
        flatten_inputs(gm, args, {**kwargs, "bias": kwargs["scale"]})


def test_observe_and_replace_hooks():
    torch.manual_seed(1)
    model = _Scaled().eval()
    gm = _graphs(model)["export"]
    linears = [n for n in gm.graph.nodes if n.target == LINEAR]
    args, kwargs = _call(seed=2)
    seen = {}
    runner = GraphRunner(gm)
    runner.run(args, kwargs, observe={linears[1]: lambda node, a, kw, out: seen.update(input=a[0], output=out)})
    with torch.no_grad():
        h = torch.tanh(model.first(args[0])) * kwargs["scale"]
        torch.testing.assert_close(seen["input"], h)
        torch.testing.assert_close(seen["output"], model.second(h))
    pruned = model.second.weight.detach() * (torch.rand_like(model.second.weight) > 0.5)
    replaced = runner.run(args, kwargs, replace={linears[1]: replace_argument(1, pruned)})
    with torch.no_grad():
        h2 = torch.tanh(torch.nn.functional.linear(h, pruned, model.second.bias)) + kwargs["shift"]
        expected = model.third(h2 + args[0])
    torch.testing.assert_close(replaced["out"], expected)
    assert not torch.allclose(replaced["out"], model(*args, **kwargs)["out"])


def test_suffix_run_from_the_cache_equals_a_full_run():
    torch.manual_seed(2)
    model = _Scaled().eval()
    gm = _graphs(model)["export"]
    linears = [n for n in gm.graph.nodes if n.target == LINEAR]
    runner = GraphRunner(gm, cut_nodes=linears[1:])
    args, kwargs = _call(seed=3, length=9)
    cache, dense = runner.run_and_cache(args, kwargs)
    torch.testing.assert_close(dense["out"], runner.run(args, kwargs)["out"])
    assert linears[2] not in cache            # computed after every cut: never cached
    for node in linears[1:]:
        weight = torch.randn(11, 11)
        replace = {node: replace_argument(1, weight)}
        torch.testing.assert_close(runner.run_suffix(cache, replace)["out"],
                                   runner.run(args, kwargs, replace=replace)["out"])
    with pytest.raises(ValueError, match="cut nodes"):
        runner.run_suffix(cache, {linears[0]: replace_argument(1, torch.randn(11, 11))})
