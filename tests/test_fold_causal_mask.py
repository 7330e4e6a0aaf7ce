"""fold_causal_mask: in-graph causal masks become causal=True; padding masks stay."""
import pytest
import torch

import sparsec
from models import TINY_MODELS


@pytest.mark.parametrize("name,folded", [("llama_gqa", True), ("gpt2", True), ("bert_sdpa", False)])
def test_fold_only_shape_only_causal_masks(name, folded):
    torch.manual_seed(0)
    builder, make_inputs, _ = TINY_MODELS[name]
    model, example = builder()
    cm = sparsec.compile(model, example, recall=1.0)     # all dense: folding alone is compared
    for site in cm.plan.attention:
        assert site.causal is folded and site.has_mask is not folded
    graph_masks = [n.args[3] for n in cm.graph_module.graph.nodes
                   if n.op == "call_function" and "sparsec" in str(n.target)]
    assert all((mask is None) is folded for mask in graph_masks)
    inputs = make_inputs(3, 29)
    with torch.no_grad():
        torch.testing.assert_close(cm(**inputs)[0], model(**inputs)[0], rtol=1e-5, atol=1e-5)


def test_padding_mask_input_is_never_folded():
    torch.manual_seed(1)
    builder, make_inputs, _ = TINY_MODELS["llama_gqa"]
    model, example = builder()
    example = dict(example, attention_mask=torch.ones_like(example["input_ids"]))
    cm = sparsec.compile(model, example)
    assert all(not site.causal and site.has_mask for site in cm.plan.attention)
    assert any("attention_mask" in note for site in cm.plan.attention for note in site.notes)
