"""Where a method's quantization time goes on SmolLM2-135M, split into the stages it records per
linear (`*_seconds` in each layer's info), optionally against another method on the same calibration.

    python -m quantlab.experiments.benchmarks.method_cost --method awq                  # AWQ: stats, scale, clip, quant
    python -m quantlab.experiments.benchmarks.method_cost --method slim_llm --bits 2 --against gptq --blocks 4
    python -m quantlab.experiments.benchmarks.method_cost --method vptq --bits 2 --set vector_len=6 --set centroids=1024
    python -m quantlab.experiments.benchmarks.method_cost --record outputs/runs/RUN/result.json   # a real run's record

Stages by method: AWQ stats / scale / clip / quant; GPTQ forward / hessian / solver; SliM-LLM
hessian / search (SBA: salience, the extra pass and its candidate quantizations) / solver (SQC and
the column solver); VPTQ forward / hessian / kmeans / pass. `other` is a layer's seconds not
covered by its stages. With --record, the run's `compare_with` methods are split the same way,
so SliM-LLM's record with `compare_with=[gptq]` gives both sides of the "within 2x GPTQ" target.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

# Keys that total other stages (VPTQ's quantize_seconds holds its kmeans and pass seconds).
TOTALS = ("quantize_seconds",)


def split_by_stage(layers: list[dict]) -> dict[str, float]:
    """Seconds per stage summed over one run's layer records, plus `other` (a layer's seconds that
    no stage covers) and `total` (the layers' seconds)."""
    totals: dict[str, float] = defaultdict(float)
    for layer in layers:
        covered = 0.0
        for key, value in layer["info"].items():
            if key.endswith("_seconds") and key not in TOTALS and isinstance(value, (int, float)):
                totals[key.removesuffix("_seconds")] += float(value)
                covered += float(value)
        totals["other"] += max(float(layer["seconds"]) - covered, 0.0)
        totals["total"] += float(layer["seconds"])
    return dict(totals)


def per_role(layers: list[dict]) -> dict[str, float]:
    """Seconds per linear role (q_proj, down_proj, ...), summed over blocks."""
    seconds: dict[str, float] = defaultdict(float)
    for layer in layers:
        seconds[layer["name"].split(".")[-1]] += float(layer["seconds"])
    return dict(seconds)


def print_split(title: str, layers: list[dict], n_blocks: int, wall: float | None = None) -> dict[str, float]:
    stages = split_by_stage(layers)
    total = stages.pop("total")
    print(f"{title}: layers {total:.1f} s" + (f", quantize_model wall {wall:.1f} s" if wall is not None else ""))
    for stage, seconds in stages.items():
        print(f"  {stage:8s} {seconds:8.1f} s  ({seconds / max(total, 1e-12):5.1%})  {seconds / n_blocks:6.2f} s/block")
    print("  per linear role (all stages, summed over blocks):")
    for name, seconds in per_role(layers).items():
        print(f"    {name:12s} {seconds:8.1f} s")
    return {**stages, "total": total}


def _from_record(path: Path) -> None:
    record = json.loads(path.read_text())
    entries = [(record["method"], record)] + [(c["method"], c) for c in record.get("comparisons", [])]
    walls = {}
    for name, entry in entries:
        layers = entry.get("layers") or []
        n_blocks = len({layer["name"].rsplit(".", 2)[0] for layer in layers}) or 1
        title = f"{name} W{entry.get('bits', record.get('bits'))} g{entry.get('group_size', record.get('group_size'))}"
        # quantize_s: the whole quantization (the driver's block forwards included)
        walls[name] = (entry.get("timings") or {}).get("quantize_s")
        print_split(title, layers, n_blocks, walls[name])
    if len(walls) > 1 and all(walls.values()):
        first, *others = walls
        for other in others:
            print(f"{first} / {other}: {walls[first] / walls[other]:.2f}x (quantize_model wall, as recorded)")


def _parse_set(items: list[str]) -> dict[str, object]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. --set centroids=1024")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m quantlab.experiments.benchmarks.method_cost", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--record", type=Path, help="split a run's result.json instead of running")
    parser.add_argument("--method", default="awq", help="a method config name (conf/method/)")
    parser.add_argument("--against", help="another method on the same calibration, e.g. gptq")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a method field")
    parser.add_argument("--dataset", default="c4")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration samples (AWQ: lines)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=None, help="quantize only the first N blocks")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    if args.record is not None:
        _from_record(args.record)
        return

    from omegaconf import OmegaConf

    from quantlab.experiments.data.calibration import CalibrationSpec, calibration_samples
    from quantlab.experiments.models.loading import load_model
    from quantlab.experiments.run.cli import load_group_option
    from quantlab.experiments.run.pipeline import quantize_model
    from quantlab.experiments.run.schema import model_spec, validate_method
    from quantlab.methods.base import get_method_class

    def build(name: str, fields: dict[str, object]):
        section = OmegaConf.merge(load_group_option("method", name), fields)
        resolved = OmegaConf.create({"bits": args.bits, "group_size": args.group_size, "method": section})
        method_name, config = validate_method(OmegaConf.to_container(resolved, resolve=True)["method"])
        return get_method_class(method_name)(config)

    methods = [(args.method, build(args.method, _parse_set(args.set)))]
    if args.against:
        methods.append((args.against, build(args.against, {})))
    spec = model_spec(load_group_option("model", "smollm2-135m"))
    walls = {}
    for name, method in methods:
        loaded = load_model(spec)  # a fresh full-precision model per method
        model, arch = loaded.model, loaded.architecture
        if args.blocks is not None:
            del arch.block_list(model)[args.blocks :]
            model.config.num_hidden_layers = args.blocks
        sampling = "awq" if name == "awq" else "gptq"  # each reference's own sampling (AWQ: seed 42)
        calib = calibration_samples(
            CalibrationSpec(args.dataset, args.nsamples, args.seqlen, 42 if name == "awq" else 0, sampling), loaded.tokenizer
        )
        start = time.perf_counter()
        report = quantize_model(model, arch, method, calib, loaded.device, args.batch_size, progress=False)
        walls[name] = time.perf_counter() - start
        n_blocks = len(arch.block_list(model))
        print(f"\n{name} W{args.bits} g{args.group_size} on SmolLM2-135M ({loaded.device.type}, "
              f"{torch.get_num_threads()} threads), {n_blocks} blocks, calibration {args.dataset} "
              f"{calib.shape[0]} x {calib.shape[1]} ({sampling} sampling)")
        print(f"  driver: capture {report.seconds.get('capture_s', 0):.1f} s, "
              f"block outputs {report.seconds.get('block_forward_s', 0):.1f} s")
        print_split(name, [r.as_dict() for r in report.layers], n_blocks, walls[name])
        del loaded, model
    if args.against:
        print(f"\n{args.method} / {args.against}: {walls[args.method] / walls[args.against]:.2f}x (quantize_model wall)")


if __name__ == "__main__":
    main()
