"""The export evidence (README, "Export"): exported files read back by other loaders.

    python -m quantlab.experiments.benchmarks.export_evidence gguf RUN_DIR
        RUN_DIR: an RTN W4 g32 float-zero run of SmolLM2 with export=gguf. Compares the exported
        Q4_1 file with the Q4_1 file SmolLM2 ships as, block by block (codes, d, m; the blocks whose
        codes span the full range and the others, counted), and the perplexity of the exported file
        loaded through transformers' GGUF loader with the shipped file's (the run's baseline) on the
        run's windows.
    python -m quantlab.experiments.benchmarks.export_evidence checkpoints RUN_DIR
        RUN_DIR: a run with save_model=true (GPTQ W4 g128 in the README). Exports compressed-tensors
        and GPTQ, reloads the first through transformers + compressed-tensors and the second through
        the independent unpacker (experiments/export/readers.py), and compares weights, logits and
        perplexity with the run's fake-quant model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _windows(tokenizer, seqlen: int, n: int) -> torch.Tensor:
    from quantlab.experiments.data.protocols import eval_windows

    return eval_windows("wikitext2", tokenizer, seqlen, n).input_ids


def _ppl(model, ids: torch.Tensor) -> float:
    from quantlab.experiments.evaluation.perplexity import perplexity
    from quantlab.experiments.models.adapters import resolve_architecture

    return perplexity(model, resolve_architecture(model), ids, batch_size=1).value


def gguf_blocks_report(exported: Path) -> dict:
    from gguf import GGUFReader, quants

    from quantlab.experiments.export.readers import decode_gguf_blocks
    from quantlab.experiments.models.loading import package_gguf_path

    original = GGUFReader(package_gguf_path())
    ours = {t.name: t for t in GGUFReader(exported).tensors}
    totals = {"tensors": 0, "blocks": 0, "full_range": 0, "full_range_bytes_equal": 0, "other": 0,
              "other_bytes_equal": 0, "other_values_equal": 0, "values_equal": 0, "zero_d": 0,
              "other_tensors_bytes_equal": 0, "other_tensors": 0}
    other_ranges: dict[str, int] = {}
    for tensor in original.tensors:
        mine = ours[tensor.name]
        if tensor.tensor_type.name != "Q4_1":
            totals["other_tensors"] += 1
            totals["other_tensors_bytes_equal"] += int(
                mine.tensor_type == tensor.tensor_type and np.array_equal(np.asarray(mine.data), np.asarray(tensor.data)))
            continue
        assert mine.tensor_type.name == "Q4_1", tensor.name
        a = np.asarray(tensor.data).reshape(-1, 20)
        b = np.asarray(mine.data).reshape(-1, 20)
        theirs = decode_gguf_blocks(a, "Q4_1")  # equal bytes: codes, d and m all equal
        full = (theirs["q"].min(axis=1) == 0) & (theirs["q"].max(axis=1) == 15) & (theirs["d"] != 0)
        same_bytes = (a == b).all(axis=1)
        same_values = (quants.dequantize(a, tensor.tensor_type) == quants.dequantize(b, tensor.tensor_type)).all(axis=1)
        totals["tensors"] += 1
        totals["blocks"] += len(a)
        totals["full_range"] += int(full.sum())
        totals["full_range_bytes_equal"] += int((full & same_bytes).sum())
        totals["other"] += int((~full).sum())
        totals["other_bytes_equal"] += int((~full & same_bytes).sum())
        totals["other_values_equal"] += int((~full & same_values).sum())
        totals["values_equal"] += int(same_values.sum())
        totals["zero_d"] += int((theirs["d"] == 0).sum())
        for lo, hi in zip(theirs["q"][~full].min(axis=1), theirs["q"][~full].max(axis=1)):
            other_ranges[f"{lo}..{hi}"] = other_ranges.get(f"{lo}..{hi}", 0) + 1
    totals["other_code_ranges"] = dict(sorted(other_ranges.items(), key=lambda kv: -kv[1])[:8])
    return totals


def gguf_evidence(run_dir: Path, windows: int | None, seqlen: int | None) -> dict:
    """The run's own windows (its eval protocol) unless given: the shipped file's perplexity is
    then the run's baseline, already in its record."""
    from quantlab.experiments.models.loading import ModelSpec, load_model

    record = json.loads((run_dir / "result.json").read_text())
    exported = Path(record["export"]["path"]) / "model.gguf"
    report = {"export": {k: record["export"].get(k) for k in ("bytes", "gguf_types", "copied_from_source", "seconds")}}
    report["blocks"] = gguf_blocks_report(exported)
    protocol = record["eval_protocol"]["ppl"]["wikitext2"]
    seqlen = seqlen or protocol["seqlen"]
    windows = windows or protocol["n_windows"]
    loaded = load_model(ModelSpec(name="export", source="gguf", path=str(exported), dtype="float32"))
    report["ppl"] = {
        "exported file (transformers' GGUF loader)": _ppl(loaded.model, _windows(loaded.tokenizer, seqlen, windows)),
        "shipped Q4_1 file (the run's baseline)": record["baseline"]["ppl"]["wikitext2"]["value"],
        "the run (fake-quant)": record["metrics"]["ppl"]["wikitext2"]["value"],
        "windows": f"wikitext2, {windows} x {seqlen}",
    }
    return report


def _logit_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def checkpoint_evidence(run_dir: Path, windows: int, seqlen: int) -> dict:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from quantlab.experiments.export import export_model
    from quantlab.experiments.export.readers import read_gptq
    from quantlab.experiments.export.source import find_saved_model
    from quantlab.experiments.models.quantized import load_formats, load_quantized_model

    saved = find_saved_model(run_dir)
    fake, tokenizer, _ = load_quantized_model(saved, backend="fake")  # the run's fake-quant model, fp32
    ids = _windows(tokenizer, seqlen, windows)
    ours = [fake(ids[i : i + 1]).logits.float() for i in range(len(ids))]
    report: dict = {"fake_quant_ppl": _ppl(fake, ids)}
    formats = load_formats(saved)
    symmetric = all(fmt.zero_format == "none" for fmt in formats.values())
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        ct = export_model(saved, "compressed-tensors", Path(scratch) / "ct")
        options = {} if symmetric else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
        model = AutoModelForCausalLM.from_pretrained(Path(scratch) / "ct", dtype=torch.float32, **options)
        weight_error = max(float((model.get_submodule(n).weight.float() - fake.get_submodule(n).weight).abs().max())
                           for n in formats)
        theirs = [model(ids[i : i + 1]).logits.float() for i in range(len(ids))]
        report["compressed-tensors"] = {
            "bytes": ct["bytes"], "notes": ct["notes"], "scale_dtype": ct["scale_dtype"],
            "loader": "transformers + compressed-tensors" + ("" if symmetric else " (dequantize=True)"),
            "max_weight_abs_diff": weight_error,
            "max_logit_rel_diff": max(_logit_error(t, o) for t, o in zip(theirs, ours)),
            "ppl": _ppl(model, ids), "seconds": time.perf_counter() - start,
        }
        del model
        gptq = export_model(saved, "gptq", Path(scratch) / "gptq", checkpoint_format="gptq")
        dense = read_gptq(Path(scratch) / "gptq")
        unpacked, _, _ = load_quantized_model(saved, backend="fake")
        for name, weight in dense.items():
            unpacked.get_submodule(name).weight.copy_(weight)
        stored_error = max(float((dense[n] - formats[n].rounded_to_storage().dequantize()).abs().max()) for n in formats)
        theirs = [unpacked(ids[i : i + 1]).logits.float() for i in range(len(ids))]
        report["gptq"] = {
            "bytes": gptq["bytes"], "loader": "independent unpacker (experiments/export/readers.py)",
            "max_abs_diff_to_stored_weights": stored_error,
            "max_logit_rel_diff": max(_logit_error(t, o) for t, o in zip(theirs, ours)),
            "ppl": _ppl(unpacked, ids),
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("gguf", "checkpoints"))
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--windows", type=int, default=None, help="default: gguf: the run's; checkpoints: 4")
    parser.add_argument("--seqlen", type=int, default=None, help="default: gguf: the run's; checkpoints: 512")
    args = parser.parse_args()
    if args.what == "gguf":
        report = gguf_evidence(args.run_dir, args.windows, args.seqlen)
    else:
        report = checkpoint_evidence(args.run_dir, args.windows or 4, args.seqlen or 512)
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
