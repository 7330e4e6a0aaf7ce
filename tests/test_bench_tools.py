"""The measurement subcommands that run without a GPU: ``sparsec bench cost-model --refit``
and ``sparsec bench linear --report`` read the packaged h100 measurements, which must still
give the constants the cost model and the sparse-linear runtime use; ``sparsec bench onnx``
runs end to end at a tiny size."""
import json
import subprocess
import sys

import pytest

from sparsec.tools.bench_cost_model import fit, packaged_measurements as attention_measurements
from sparsec.tools.bench_linear import packaged_measurements as linear_measurements, speedup_table
from sparsec.tools.cli import main
from sparsec.analysis.cost_model import cost_profile
from sparsec.analysis.linear_costs import MEASURED_SPEEDUP


def test_packaged_attention_measurements_refit_to_the_h100_profile():
    fitted = fit(attention_measurements())
    profile = cost_profile("h100")
    for name, rates in (("dense", profile.dense), ("sparse", profile.sparse)):
        assert fitted[name]["tflops"] == pytest.approx(rates.tflops, abs=0.05)
        assert fitted[name]["row_block_us"] == pytest.approx(rates.row_block_us, abs=5e-5)
        assert fitted[name]["launch_us"] == pytest.approx(rates.launch_us, abs=0.05)


def test_h200_host_and_dynamic_series_refit_to_its_profile():
    """The H200 run's host series (per-call host time of sparsec's ops) and dynamic series
    (dynamic_blocks' estimate where the GPU bounds it) are what the cost model prices sites
    with. A dynamic group's estimate and tables replay as a CUDA graph: its host term is a few
    static groups' worth (eager, its ~60 ops took 1.65 ms a call)."""
    data = attention_measurements("h200")
    fitted, profile = fit(data), cost_profile("h200")
    host = data["host"]
    assert fitted["host"]["sparse_site_us"] == host["one_group_site_us"] == profile.host.sparse_site_us
    assert fitted["host"]["group_us"] == pytest.approx(host["two_group_site_us"] - host["one_group_site_us"])
    assert fitted["host"]["dynamic_group_us"] == pytest.approx(host["dynamic_site_us"] - host["one_group_site_us"])
    assert vars(profile.host) == fitted["host"]
    assert profile.dynamic_estimate_ps == pytest.approx(fitted["dynamic_estimate_ps"], rel=1e-9)
    assert 0.0 <= profile.dynamic_estimate_ps < 1.0
    assert profile.host.group_us < profile.host.dynamic_group_us < 10 * profile.host.group_us
    assert cost_profile("h100").host is None                 # not measured there: GPU time alone


def test_add_series_needs_a_saved_run_for_the_others(capsys):
    with pytest.raises(SystemExit, match="needs --refit"):
        main(["bench", "cost-model", "--add-series", "host"])
    with pytest.raises(SystemExit, match="needs --refit"):
        main(["bench", "cost-model", "--refit", "h200", "--add-series", "hosts"])


def test_packaged_linear_measurements_give_the_runtime_speedup_table():
    assert speedup_table(linear_measurements()["rows"]) == MEASURED_SPEEDUP


def test_refit_and_report_print_without_a_gpu(capsys, tmp_path):
    record = tmp_path / "calibration.json"
    assert main(["bench", "cost-model", "--refit", "--json", str(record)]) == 0
    out = capsys.readouterr().out
    assert "dense        rate   611.6 TFLOP/s" in out and "sparse       rate   429.2 TFLOP/s" in out
    assert json.loads(record.read_text())["fit"]["sparse"]["tflops"] == pytest.approx(429.15, abs=0.01)
    assert main(["bench", "cost-model", "--refit", str(record)]) == 0
    assert "429.2 TFLOP/s" in capsys.readouterr().out
    assert main(["bench", "cost-model", "--refit", "h200"]) == 0
    assert "dense        rate   601.1 TFLOP/s" in capsys.readouterr().out
    assert main(["bench", "linear", "--report"]) == 0
    out = capsys.readouterr().out
    assert "MEASURED_SPEEDUP" in out and "4096->11008" in out


def test_packaged_measurements_are_found_from_another_directory(tmp_path):
    code = ("from sparsec.tools.bench_cost_model import packaged_measurements as a; "
            "from sparsec.tools.bench_linear import packaged_measurements as b; "
            "print(a('h200')['device'], len(b('h100')['rows']), a('no_such_target'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert done.stdout.split()[-3:] == ["H200", "105", "None"]


def test_a_missing_measurement_file_is_one_line(capsys, tmp_path):
    assert main(["bench", "linear", "--report", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_onnx_benchmark_runs_at_a_tiny_size(capsys):
    assert main(["bench", "onnx", "--lengths", "128", "--layers", "1", "--repeat", "1", "--threads", "1"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert row[0] == "128" and float(row[-1]) < 1e-3       # max |err| of the sparse export vs PyTorch


@pytest.mark.real
def test_compile_benchmark_times_every_pass_at_a_tiny_size(capsys):
    from sparsec.testing.real_models import RealModelUnavailable, load_smollm2
    try:
        load_smollm2()
    except RealModelUnavailable as error:
        pytest.skip(str(error))
    assert main(["bench", "compile", "--layers", "2", "--length", "128", "--batches", "1"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["heads"] == 18 and {"calibrate", "classify_heads", "verify", "lower"} <= set(record["passes"])
    assert record["wall_s"] >= sum(record["passes"].values()) - 0.1
    assert load_smollm2()[0].config.num_hidden_layers == 30        # the shared model is left whole
