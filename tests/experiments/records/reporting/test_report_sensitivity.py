"""quantlab-report on sensitivity records: the damage matrix and heatmap, the proxies ranked by
Spearman ρ with the measured damage, the CLI."""

from __future__ import annotations

import json

import pytest

from quantlab.experiments.evaluation.statistics import spearman
from quantlab.experiments.records.reporting.cli import main
from quantlab.experiments.records.reporting.plots import sensitivity_heatmap
from quantlab.experiments.records.reporting.records import ReportError
from quantlab.experiments.records.reporting.sensitivity import damage_matrix, load_sensitivity, proxy_ranking

ROLES = ["self_attn.q_proj", "mlp.down_proj"]


def _record() -> dict:
    """Three blocks x two roles; the 'good' proxy orders the units as their ΔNLL, 'bad' reverses it."""
    units = []
    for block in range(3):
        for r, role in enumerate(ROLES):
            rank = 2 * block + r
            widths = {}
            for bits in (2, 4):
                nll = (rank + 1) / bits
                widths[str(bits)] = {
                    "ppl": 10.0, "seconds": 0.1, "storage_bits": 100 * bits,
                    "nll_delta": {"mean_nll_delta": nll, "ci_low": nll - 0.1, "ci_high": nll + 0.1},
                    "kl": {"mean_kl": nll / 2},
                    "proxies": {"good": nll * 3, "bad": -nll, "flat": 1.0},
                }
            units.append({"name": f"model.layers.{block}.{role}", "block": block, "role": role,
                          "linears": [f"model.layers.{block}.{role}"], "numel": 100, "widths": widths})
    return {"version": 1, "model": {"spec": {"name": "tiny"}, "fingerprint": None}, "method": "rtn", "unit": "linear",
            "bits": [2, 4], "group_size": 32, "reference": {"ppl": 10.0}, "units": units}


def test_damage_matrix_is_blocks_by_roles_at_the_chosen_width():
    matrix = damage_matrix(_record(), 4)
    assert list(matrix.columns) == ROLES and list(matrix.index) == [0, 1, 2]
    assert matrix.loc[2, "mlp.down_proj"] == pytest.approx(6 / 4)
    assert damage_matrix(_record(), 2, "kl").loc[0, "self_attn.q_proj"] == pytest.approx(0.25)
    with pytest.raises(ReportError, match="measured widths"):
        damage_matrix(_record(), 3)


def test_proxies_are_ranked_by_their_spearman_correlation():
    record = _record()
    table = proxy_ranking(record, 2)
    assert list(table["proxy"]) == ["good", "bad", "flat"]  # ρ 1, -1, undefined (a constant proxy) last
    assert table.loc[0, "ρ vs ΔNLL at W2"] == pytest.approx(1.0) and table.loc[1, "ρ vs ΔNLL at W2"] == pytest.approx(-1)
    pooled = [(e["proxies"]["good"], e["nll_delta"]["mean_nll_delta"]) for u in record["units"] for e in u["widths"].values()]
    assert table.loc[0, "ρ vs ΔNLL all widths"] == pytest.approx(spearman(*zip(*pooled)))
    assert table.loc[0, "units"] == 6


def test_heatmap_draws_the_matrix(tmp_path):
    out = tmp_path / "heat.png"
    figure = sensitivity_heatmap(damage_matrix(_record(), 2), out, "t")
    image = figure.axes[0].images[0]
    assert image.get_array().shape == (3, 2) and out.stat().st_size > 0
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["q_proj", "down_proj"]


def test_cli_prints_the_ranking_and_writes_the_heatmap(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "sensitivity.json").write_text(json.dumps(_record()))
    assert load_sensitivity([tmp_path])[0][0] == run / "sensitivity.json"
    assert main([str(tmp_path), "--sensitivity", "2"]) == 0
    printed = capsys.readouterr().out
    assert "ρ vs ΔNLL at W2" in printed and printed.index("| good") < printed.index("| bad")
    assert main([str(run), "--sensitivity", "4", "--plot", "heatmap", str(tmp_path / "h.png")]) == 0
    assert (tmp_path / "h.png").is_file()
    assert main([str(tmp_path / "nothing"), "--sensitivity", "2"]) == 1
    assert "no sensitivity.json" in capsys.readouterr().err
