"""QAT end to end: `python -m quantlab.experiments.run.cli model=tiny-llama method=qat bits=3 method.steps=5`
writes the loss curve into result.json and quantlab-report plots it; a QAT run exports as RTN's
grid does."""

import json

import torch

from quantlab.experiments.export.readers import read_gptq
from quantlab.experiments.models.quantized import load_formats
from quantlab.experiments.records.reporting import load_curves, load_runs, loss_plot
from quantlab.experiments.records.reporting.cli import main as report_main
from quantlab.experiments.run.cli import run_from_config
from tests.conftest import compose_config, run_quantlab
from tests.experiments.run.test_cli import TINY
from tests.experiments.store.test_artifacts import cache  # noqa: F401  (fixture)
from tests.experiments.store.test_shared_inputs import private_cache


def test_a_qat_run_records_its_loss_curve_and_the_report_plots_it(tmp_path, data_dir):
    cache_dir = private_cache(tmp_path)
    overrides = [
        "model=tiny-llama", "method=qat", "bits=3", "group_size=32", "method.steps=5", "method.lr=0.01",
        "method.optimizer=adam", "method.batch_size=2", "calib=pydocs", "calib.nsamples=4", "calib.seqlen=64",
        "eval.ppl.datasets=[pydocs]", "eval.ppl.seqlen=64", "eval.ppl.max_windows=4",
        f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = run_quantlab(*overrides, QUANTLAB_DATA_DIR=str(data_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "ok" and record["method"] == "qat" and record["config"]["method"]["init"] == "rtn"
    fine_tune = record["fine_tune"]
    assert fine_tune["curve_columns"] == ["step", "loss", "lr"] and fine_tune["steps"] == 5
    assert [row[0] for row in fine_tune["curve"]] == [1, 2, 3, 4, 5]
    assert all(row[1] > 0 for row in fine_tune["curve"]) and fine_tune["curve"][0][2] == 0.01  # cosine from lr
    assert fine_tune["tokens_seen"] == 5 * 2 * 64 and fine_tune["seconds"] > 0
    assert record["timings"]["quantize_fine_tune_s"] >= fine_tune["seconds"]
    layers = record["layers"]
    assert len(layers) == 14 and all(layer["bits"] == 3 and "qat" in layer["info"] for layer in layers)
    bits = sum(layer["storage_bits"] for layer in layers) / sum(a * b for a, b in (layer["shape"] for layer in layers))
    assert record["avg_bits"] == bits

    curves = load_curves(load_runs([tmp_path / "run"]))
    assert list(curves["step"]) == [1, 2, 3, 4, 5] and list(curves["loss"]) == [row[1] for row in fine_tune["curve"]]
    figure = loss_plot(curves)
    assert list(figure.axes[0].lines[0].get_ydata()) == list(curves["loss"])
    assert "steps=5" in figure.axes[0].lines[0].get_label()  # the knobs that tell runs apart
    assert report_main([str(tmp_path / "run"), "--plot", "loss", str(tmp_path / "loss.png")]) == 0
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_a_qat_run_exports_its_grid_codes(tmp_path, cache, data_dir):  # noqa: F811
    overrides = [*TINY, "method=qat", "method.steps=2", "method.lr=0.01", "method.optimizer=adam", "export=gptq"]
    record = run_from_config(compose_config(*overrides), tmp_path / "run", progress=False)
    assert record["export"]["n_linears"] == len(record["layers"]) == 14
    formats = load_formats(record["export"]["source"])
    dense = read_gptq(tmp_path / "run" / "export-gptq")
    for name, fmt in formats.items():
        assert torch.equal(dense[name], fmt.rounded_to_storage().dequantize()), name
    assert sum(layer["info"]["qat"]["codes_changed"] for layer in record["layers"]) > 0  # trained, not the init
