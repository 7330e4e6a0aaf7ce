"""The end-to-end benchmark's CPU path (``sparsec bench e2e --tiny``): the script the GPU run uses."""
import json
import math

from sparsec.bench_e2e import PLANT_KINDS, format_table, mixed_plant
from sparsec.cli import main


def test_mixed_plant_keeps_one_dense_head_per_kv_group_and_mixes_kinds():
    plant = mixed_plant(layers=3, heads=32, kv_heads=8, windows=[512, 1024])
    for layer, heads in plant.items():
        assert sorted(heads) == [h for h in range(32) if h % 4 != 3]
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
    errors = data["errors"]
    assert set(errors) == {"sparsec_vs_eager_at_256", "sparsec_vs_eager_at_192"}
    assert all(math.isfinite(e) and 0 < e < 0.2 for e in errors.values())     # 95% recall per head
    table = format_table(data)
    assert capsys.readouterr().out.rstrip().endswith(table)
    assert any(line.startswith("sparsec ") for line in table.splitlines())
