"""`export=` on a run (written once the quantized model is saved, recorded in result.json) and the
`quantlab-export` command on a finished run."""

import json
import subprocess
import sys

import pytest
import torch

from quantlab.experiments.export.cli import main as export_main
from quantlab.experiments.export.readers import read_compressed_tensors, read_gptq
from quantlab.experiments.models.quantized import load_formats
from quantlab.experiments.run.cli import run_from_config
from tests.conftest import REPO, compose_config
from tests.experiments.run.test_cli import TINY
from tests.experiments.store.test_artifacts import cache  # noqa: F401  (fixture)


def test_a_run_exports_its_quantized_model(tmp_path, cache, data_dir):  # noqa: F811
    record = run_from_config(compose_config(*TINY, "export=gptq"), tmp_path / "run", progress=False)
    exported = record["export"]
    assert exported["format"] == "gptq" and exported["path"] == str(tmp_path / "run" / "export-gptq")
    assert exported["n_linears"] == len(record["layers"])
    formats = load_formats(exported["source"])
    dense = read_gptq(tmp_path / "run" / "export-gptq")
    for name, fmt in formats.items():
        assert torch.equal(dense[name], fmt.rounded_to_storage().dequantize()), name
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["export"]["bytes"] == exported["bytes"] and saved["status"] == "ok"

    # a finished run, exported afterwards from its directory (the cached copy its record names)
    assert export_main([str(tmp_path / "run"), str(tmp_path / "ct"), "--format", "compressed-tensors"]) == 0
    dense = read_compressed_tensors(tmp_path / "ct")
    for name, fmt in formats.items():
        assert torch.equal(dense[name], fmt.dequantize()), name  # an fp32 model keeps fp32 scales


def test_export_path_and_gguf_on_a_run(tmp_path, cache, data_dir):  # noqa: F811
    out = tmp_path / "elsewhere" / "smol.gguf.d"
    record = run_from_config(
        compose_config(*TINY, "method.float_zero=true", "export=gguf", f"export.path={out}"),
        tmp_path / "run", progress=False,
    )
    assert record["export"]["gguf_types"] == {"Q4_1": len(record["layers"])}
    assert (out / "model.gguf").is_file() and not (tmp_path / "run" / "export-gguf").exists()


def test_the_command_refuses_with_the_reason(tmp_path, cache, data_dir):  # noqa: F811
    run_from_config(compose_config(*TINY, "method.float_zero=true", "save_model=true"), tmp_path / "run",
                    progress=False)
    done = subprocess.run(
        [sys.executable, "-m", "quantlab.experiments.export.cli", str(tmp_path / "run"), str(tmp_path / "out"),
         "--format", "compressed-tensors"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "float zero-point" in done.stderr and "export gguf" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_folder_without_a_saved_model_is_a_message(tmp_path, capsys):
    assert export_main([str(tmp_path), str(tmp_path / "out"), "--format", "gguf"]) == 2
    assert "save_model=true" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["gguf", "awq"])
def test_a_saved_model_with_act_order_is_refused_before_it_loads(fmt, tmp_path, cache, data_dir):  # noqa: F811
    """model=quantized evaluates a saved folder: its export is checked on its quantization.json."""
    from quantlab.methods.base import ConfigError

    run_from_config(compose_config(*TINY, "method=gptq", "method.act_order=true", "save_model=true"),
                    tmp_path / "run", progress=False)
    saved = tmp_path / "run" / "quantized_model"
    with pytest.raises(ConfigError, match=f"export={fmt}"):
        run_from_config(compose_config(*TINY, "model=quantized", f"model.path={saved}", f"export={fmt}"),
                        tmp_path / "again", progress=False)


def test_an_export_replaces_only_an_earlier_export(tmp_path, tiny_llama):
    from quantlab.experiments.export import MARKER, ExportRefused, export_model
    from tests.experiments.export.conftest import rtn, save_tiny

    save_tiny(tiny_llama, tmp_path / "saved", rtn(4, 32))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportRefused, match="something other than an earlier export"):
        export_model(tmp_path / "saved", "gptq", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    first = export_model(tmp_path / "saved", "gptq", tmp_path / "out")
    assert json.loads((tmp_path / "out" / MARKER).read_text())["bytes"] == first["bytes"]
    export_model(tmp_path / "saved", "awq", tmp_path / "out")  # an earlier export: replaced whole
    assert (tmp_path / "out" / "quant_config.json").is_file() and not (tmp_path / "out" / "quantize_config.json").exists()
