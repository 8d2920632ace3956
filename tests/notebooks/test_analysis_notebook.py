"""notebooks/analysis.ipynb runs end to end on a tiny sweep created here, through the same report
API as quantlab-report, and draws its plots. The committed notebook carries no outputs."""

import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from tests.conftest import run_quantlab
from tests.experiments.store.test_shared_inputs import private_cache

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "analysis.ipynb"


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_analysis_notebook_executes_on_a_tiny_sweep(tmp_path, monkeypatch):
    sweep = run_quantlab(
        "-m",
        "model=tiny-llama",
        "method=rtn",
        "bits=3,4",
        "group_size=32",
        "eval.ppl.datasets=[pydocs]",
        "eval.ppl.seqlen=64",
        "eval.ppl.max_windows=6",
        "sweep_name=nb",
        f"paths.cache_dir={private_cache(tmp_path)}",
        QUANTLAB_OUTPUT_DIR=str(tmp_path / "out"),
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    monkeypatch.setenv("QUANTLAB_SWEEP", str(tmp_path / "out" / "multiruns" / "nb"))

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()  # raises on any cell error

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    text = "\n".join(
        o.get("text", "") + json.dumps(o.get("data", {}).get("text/markdown", "")) for o in outputs
    )
    assert "2 runs, 2 method entries" in text
    assert (
        "| tiny-llama | rtn" in text
        and "| tiny-llama | fp16" in text
        and "W3 ppl" in text
        and "W4 ppl" in text
    )
    assert "\\begin{tabular}" in text  # the LaTeX table
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2, "the Pareto plot and the per-layer error plot"
