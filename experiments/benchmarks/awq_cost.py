"""AWQ's quantization time on SmolLM2-135M, split as the method records it per linear: statistics
(the capture pass over the block), scale search, clip search, and the final quantization.

    python -m experiments.benchmarks.awq_cost                       # c4, AWQ sampling, 128 lines x 512
    python -m experiments.benchmarks.awq_cost --lines 32 --blocks 4 # a quick look on a CPU

The split comes from the run record's layer infos (`stats_seconds`, `scale_seconds`,
`clip_seconds`, `quant_seconds`), so a real run's record can be summed the same way.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

STAGES = ("stats", "scale", "clip", "quant")


def split_by_stage(layers: list[dict]) -> dict[str, float]:
    """Seconds per stage, summed over the layer records of one run."""
    totals = dict.fromkeys(STAGES, 0.0)
    for layer in layers:
        for stage in STAGES:
            totals[stage] += float(layer["info"].get(f"{stage}_seconds", 0.0))
    return totals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmarks.awq_cost", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--dataset", default="c4", help="calibration dataset (pile needs the hub)")
    parser.add_argument("--lines", type=int, default=128, help="calibration lines (AWQ sampling)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=None, help="quantize only the first N blocks")
    parser.add_argument("--no-clip", action="store_true")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    from experiments.cli import load_group_option
    from experiments.data.calibration import CalibrationSpec, calibration_samples
    from experiments.models.loading import load_model
    from experiments.pipeline import quantize_model
    from experiments.schema import model_spec
    from methods.awq import AWQ, AWQConfig

    loaded = load_model(model_spec(load_group_option("model", "smollm2-135m")))
    model, arch = loaded.model, loaded.architecture
    if args.blocks is not None:
        blocks = arch.block_list(model)
        del blocks[args.blocks :]
        model.config.num_hidden_layers = len(blocks)
    spec = CalibrationSpec(args.dataset, args.lines, args.seqlen, 42, sampling="awq")
    calib = calibration_samples(spec, loaded.tokenizer)
    method = AWQ(AWQConfig(bits=args.bits, group_size=args.group_size, clip=not args.no_clip))
    start = time.perf_counter()
    report = quantize_model(model, arch, method, calib, loaded.device, args.batch_size, progress=False)
    total = time.perf_counter() - start

    layers = [r.as_dict() for r in report.layers]
    stages = split_by_stage(layers)
    n_blocks = len(arch.block_list(model))
    print(
        f"AWQ W{args.bits} g{args.group_size} on SmolLM2-135M ({loaded.device.type}, {torch.get_num_threads()} threads)"
    )
    print(f"calibration: {args.dataset}, {args.lines} lines -> {calib.shape[0]} x {calib.shape[1]} tokens")
    print(f"blocks: {n_blocks}; total quantize_model: {total:.1f} s")
    print(
        f"  driver: capture {report.seconds.get('capture_s', 0):.1f} s, FP block outputs {report.seconds['block_forward_s']:.1f} s"
    )
    for stage in STAGES:
        share = stages[stage] / max(sum(stages.values()), 1e-12)
        print(f"  {stage:6s} {stages[stage]:8.1f} s  ({share:5.1%})  {stages[stage] / n_blocks:6.2f} s/block")
    per_linear: dict[str, float] = defaultdict(float)
    for layer in layers:
        per_linear[layer["name"].split(".", 3)[-1]] += layer["seconds"]
    print("per linear role (all stages, summed over blocks):")
    for name, seconds in per_linear.items():
        print(f"  {name:22s} {seconds:8.1f} s")


if __name__ == "__main__":
    main()
