"""The end-to-end benchmark's CPU path (``sparsec bench e2e --tiny``): the script the GPU run uses."""
import json
import math

import torch

from sparsec.tools.bench_e2e import PLANT_KINDS, format_table, fp32_logits, mixed_plant, relative_error
from sparsec.testing.planted import planted_llama, planted_llama_inputs
from sparsec.tools.cli import main


def test_mixed_plant_keeps_the_last_kv_group_dense_and_mixes_kinds():
    plant = mixed_plant(layers=3, heads=32, kv_heads=8, windows=[512, 1024])
    for layer, heads in plant.items():
        assert sorted(heads) == list(range(28))
        assert {kind for kind, _ in heads.values()} == set(PLANT_KINDS)
        assert {window for _, window in heads.values()} == {512, 1024}
    assert plant[0] != plant[1]                      # kinds rotate across layers


def test_tiny_run_compiles_times_and_records_errors(tmp_path, capsys):
    path = tmp_path / "e2e.json"
    assert main(["bench", "e2e", "--tiny", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["failures"] == {}
    assert 0 < data["plan"]["sparse_heads"] < data["plan"]["heads"]
    assert all(kind in (*PLANT_KINDS, "dense") for kind in data["plan"]["kinds"])
    assert set(data["variants"]) == {"eager", "sparsec"}
    assert all(row["median_ms"] > 0 for row in data["variants"].values())
    # timed again side by side, in turn: the ratios come from these
    assert set(data["side_by_side"]) == {"eager", "sparsec"}
    assert all(len(row["times_ms"]) == data["config"]["reps"] and row["median_ms"] > 0 for row in data["side_by_side"].values())
    errors = data["errors"]
    assert set(errors) == {"sparsec_vs_eager_at_1024", "sparsec_vs_eager_at_768"}
    assert all(math.isfinite(e) and 0 < e < 0.2 for e in errors.values())     # 95% recall per head
    table = format_table(data)
    assert capsys.readouterr().out.rstrip().endswith(table)
    assert any(line.startswith("sparsec ") for line in table.splitlines())


def test_dense_stability_measures_low_precision_against_fp32_and_the_table_warns():
    def floor(plant, long_context=False, length=96):
        model = planted_llama(layers=1, heads=4, kv_heads=2, head_dim=64, hidden=256, intermediate=128, vocab=64,
                              plant=plant, long_context=long_context).to(torch.bfloat16)
        ids = planted_llama_inputs(length=length, vocab=64)
        with torch.no_grad():
            return relative_error(fp32_logits(model, ids), model(ids))

    assert 1e-4 < floor({0: {}}) < 0.05                          # random weights: bf16 rounding only
    assert floor({0: {0: ("window", 16)}}) > 0.05                # Gaussian amplitudes: bf16 is chaotic
    # The benchmark's model: power-law windows stay within bf16 rounding, here and long.
    plant = {0: {0: ("window", 16), 1: ("sink_window", 32), 2: ("vertical_stripe", 16)}}
    assert floor(plant, long_context=True) < 0.05
    assert floor(plant, long_context=True, length=2048) < 0.05
    data = {"config": {"device": "cpu", "torch": "", "dtype": "bf16", "n": 96, "layers": 1, "heads": 4,
                       "kv_heads": 2, "head_dim": 64, "hidden": 128, "intermediate": 128, "vocab": 64},
            "variants": {}, "errors": {"dense_bf16_vs_fp32_at_96": 0.18}, "failures": {}}
    assert "numerically unstable at this length" in format_table(data)
