"""Export: a run's saved quantized model written in another project's checkpoint format.

This sub-package owns the conversion of quantlab's saved model (experiments/models/quantized.py:
packed UniformWeights + every other parameter) into:

- `compressed_tensors.py`: compressed-tensors `pack-quantized` (llm-compressor's output; vLLM,
  transformers);
- `gptq.py`: the AutoGPTQ / GPTQModel checkpoint (`qweight`, `qzeros`, `scales`, `g_idx`,
  `quantize_config.json`, v1's zero-point-minus-one or v2's true zero), and AutoAWQ's GEMM layout;
- `gguf.py`: GGUF with ggml's legacy block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), written with
  gguf-py's writer from our codes;
- `layout.py`: what a run's weights are and the one table of what each format refuses (and why),
  applied both before a run with `export=` loads its model (`plan.py`) and to saved weights;
- `source.py` / `grids.py`: reading a saved model; re-expressing a grid at a dividing group size;
- `readers.py`: independent readers of the three layouts (oracles for tests and the evidence);
- `cli.py`: `quantlab-export RUN_DIR --format F OUT`.

Why here and not in kernels/: each layout is only meaningful with its files (tensor names, config
JSON, GGUF metadata and tokenizer, llama.cpp's q/k row order), which is I/O and model knowledge;
kernels/ keeps our own format and its runtime. The tensor conversions are still plain functions
(`layer_tensors`, `gguf_blocks`, ...) that tests call without files.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from quantlab.experiments.export.layout import (
    EXPORT_FORMATS,
    ExportRefused,
    predicted_layout,
    refusal,
    refuse_all,
)

__all__ = ["EXPORT_FORMATS", "MARKER", "ExportRefused", "export_model", "predicted_layout", "refusal"]
MARKER = "quantlab-export.json"  # the export's summary, written into every export folder


def _writer(fmt: str):
    if fmt == "compressed-tensors":
        from quantlab.experiments.export import compressed_tensors

        return compressed_tensors.write
    if fmt == "gptq":
        from quantlab.experiments.export import gptq

        return gptq.write_gptq
    if fmt == "awq":
        from quantlab.experiments.export import gptq

        return gptq.write_awq
    if fmt == "gguf":
        from quantlab.experiments.export import gguf

        return gguf.write
    raise ExportRefused(f"unknown export format {fmt!r}; choose one of: {', '.join(EXPORT_FORMATS)}")


def export_model(source: Any, fmt: str, out: Path, **options: Any) -> dict[str, Any]:
    """Write the saved quantized model `source` (a run directory or the saved folder) as `fmt`
    into the folder `out` (replaced whole, written aside first). Raises
    ExportRefused with the reason before writing anything. Returns a summary for the record."""
    from quantlab.experiments.export.source import SavedModel, read_saved_model

    start = time.perf_counter()
    writer = _writer(fmt)
    out = Path(out).expanduser()
    replaceable(out)
    saved = source if isinstance(source, SavedModel) else read_saved_model(Path(source))
    refuse_all(fmt, saved.layouts)
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging) if staging.is_dir() else staging.unlink()
    staging.mkdir(parents=True)
    try:
        summary = writer(saved, staging, **options)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = sorted(p for p in staging.iterdir() if p.is_file())
    summary = {
        "format": fmt, "path": str(out), "source": str(saved.directory), "method": saved.method,
        "bytes": sum(p.stat().st_size for p in files), "n_linears": len(saved.formats),
        "seconds": time.perf_counter() - start, **summary,
    }
    (staging / MARKER).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)  # whole or not at all
    return summary


def replaceable(out: Path) -> None:
    """An export replaces its folder whole: only an earlier export (it holds MARKER) or an empty
    folder, never a file or a folder of something else."""
    if out.is_file():
        raise ExportRefused(f"{out} is a file; the export is a folder: choose another path")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ExportRefused(f"{out} is a folder that holds something other than an earlier export; it would be "
                            "replaced whole: choose a new or empty folder")
