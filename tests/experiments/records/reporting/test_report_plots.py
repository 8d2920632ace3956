"""Plots: read back from the returned matplotlib Figure (labels, lines, scales), plus a PNG on disk."""

import pandas as pd
import pytest

from quantlab.experiments.records.reporting.metrics import parse_metric
from quantlab.experiments.records.reporting.plots import layers_plot, pareto_front, pareto_plot
from quantlab.experiments.records.reporting.records import ReportError, load_layers, load_runs
from tests.experiments.records.reporting.test_report_records import write_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


@pytest.fixture
def sweep(tmp_path):
    for bits, gptq, rtn in [(2, 80.0, 3.5e6), (3, 15.0, 40.0), (4, 11.0, 12.5)]:
        write_run(tmp_path / "runs", f"gptq-{bits}", method="gptq", bits=bits, ppl={"wikitext2": gptq},
                  comparisons=[("rtn", {"wikitext2": rtn})])
    return load_runs([tmp_path / "runs"])


def test_pareto_front_keeps_the_points_nothing_beats():
    points = pd.DataFrame({"x": [2.0, 3.0, 3.1, 4.0], "y": [100.0, 50.0, 60.0, 20.0]})
    assert list(pareto_front(points, "x", "y")["x"]) == [2.0, 3.0, 4.0]


def test_pareto_plot_labels_series_baseline_and_scale(sweep, tmp_path):
    out = tmp_path / "pareto.png"
    figure = pareto_plot(sweep, parse_metric(None, sweep), out)
    assert_png(out)
    ax = figure.axes[0]
    assert ax.get_xlabel() == "bits per weight (average over the quantized linears)"
    assert ax.get_ylabel() == "perplexity on wikitext2 (lower is better)"
    assert "wikitext2: 40 of 148 windows x 2048 tokens" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["fp16 baseline (16 bits/weight): 10.00", "gptq", "rtn"]
    baseline = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(baseline) == 1 and list(baseline[0].get_ydata()) == [10.0, 10.0]
    assert ax.get_yscale() == "log"  # RTN W2's 3.5e6 next to 10
    # Error bars span each point's interval: ci_high - ci_low = 1 in the synthetic records.
    bars = [c for c in ax.collections if c.get_segments()]
    assert any(seg[1][1] - seg[0][1] == pytest.approx(1.0) for c in bars for seg in c.get_segments())


def test_pareto_plot_stays_linear_over_a_narrow_range(sweep):
    narrow = sweep[sweep["bits"].ge(3) & sweep["method"].eq("gptq")]
    assert pareto_plot(narrow, parse_metric(None, narrow)).axes[0].get_yscale() == "linear"


def test_pareto_plot_needs_something_to_plot(sweep):
    with pytest.raises(ReportError, match="nothing to plot"):
        pareto_plot(sweep.iloc[0:0], parse_metric("ppl:wikitext2", sweep))


def test_layers_plot_draws_one_line_per_role_per_method(sweep, tmp_path):
    run = sweep[sweep["bits"].eq(3)]  # GPTQ W3 and the RTN W3 beside it: two panels
    out = tmp_path / "layers.png"
    figure = layers_plot(load_layers(run), out)
    assert_png(out)
    panels = [ax for ax in figure.axes if ax.get_lines()]
    assert [ax.get_title() for ax in panels] == ["gptq W3 g128: 3.156 bits/weight", "rtn W3 g128: 3.156 bits/weight"]
    assert all(ax.get_xlabel() == "transformer block index" for ax in panels)
    assert "relative weight error" in panels[0].get_ylabel()
    assert [line.get_label() for line in panels[0].get_lines()] == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert list(panels[0].get_lines()[0].get_xdata()) == [0, 1, 2]
    assert [t.get_text() for t in figure.legends[0].get_texts()][:2] == ["q_proj", "k_proj"]


def test_layers_plot_refuses_a_whole_sweep(sweep, tmp_path):
    write_run(tmp_path / "runs", "gptq-8", method="gptq", bits=8, comparisons=[("rtn", {"wikitext2": 10.1})])
    everything = load_runs([tmp_path / "runs"])  # 4 runs x 2 methods: more panels than a figure holds
    with pytest.raises(ReportError, match="the layers plot shows one run: 8 method entries"):
        layers_plot(load_layers(everything))


def test_bitmap_plot_shows_each_groups_width(tmp_path):
    from quantlab.experiments.records.reporting.plots import bitmap_plot
    from quantlab.experiments.store.cache import atomic_write_json
    from tests.experiments.records.reporting.test_report_records import make_record

    record = make_record(method="slim_llm", bits=2)
    for i, layer in enumerate(record["layers"]):
        layer["info"] = {"allocation": [1, 2, 3, 2] if i % 2 else [2, 2, 2, 2, 1, 3]}
    atomic_write_json(tmp_path / "runs" / "slim" / "result.json", record)
    layers = load_layers(load_runs([tmp_path / "runs"]))
    out = tmp_path / "bits.png"
    figure = bitmap_plot(layers, out)
    assert_png(out)
    image = figure.axes[0].get_images()[0].get_array()
    assert image.shape == (21, 6) and image[0].tolist() == [2, 2, 2, 2, 1, 3]
    assert image[1][:4].tolist() == [1, 2, 3, 2] and image.mask[1][4:].all()  # a narrower layer: blank groups
    one = bitmap_plot(layers, layer="layers.2.mlp.down_proj")
    assert [t.get_text() for t in one.axes[0].get_yticklabels()] == ["model.layers.2.mlp.down_proj"]
    with pytest.raises(ReportError, match="no selected layer"):
        bitmap_plot(layers, layer="lm_head")


def test_bitmap_plot_needs_an_allocation(sweep):
    with pytest.raises(ReportError, match="per-group allocation"):
        from quantlab.experiments.records.reporting.plots import bitmap_plot

        bitmap_plot(load_layers(sweep[sweep["bits"].eq(3) & sweep["method"].eq("gptq")]))
