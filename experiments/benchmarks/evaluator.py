"""`make bench`: figures, not tests. Prints what it measured, with the protocol.

- perplexity evaluator throughput against a plain transformers loop over the same windows
  (`model(input_ids, labels=input_ids).loss` per batch), both on SmolLM2-135M;
- SmolLM2-135M load time from the converted cache;
- the quickstart's wall time and peak RSS, as a user runs it (`--quickstart`).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import time

import torch


def plain_transformers_ppl(model, windows: torch.Tensor, batch_size: int) -> tuple[float, float]:
    start = time.perf_counter()
    losses = []
    with torch.no_grad():
        for batch in windows.split(batch_size):
            for row in batch.split(1) if batch_size == 1 else [batch]:
                losses.append(model(input_ids=row, labels=row).loss.float().item() * row.shape[0])
    seconds = time.perf_counter() - start
    return math.exp(sum(losses) / windows.shape[0]), seconds


def bench_evaluator(windows_n: int, seqlen: int, batch_size: int, repeats: int) -> None:
    from quantlab.experiments.data.protocols import eval_windows
    from quantlab.experiments.evaluation.perplexity import perplexity
    from quantlab.experiments.models.loading import ModelSpec, load_model

    spec = ModelSpec(name="smollm2-135m", source="package_gguf", dtype="float32", device="auto")
    load_model(spec)  # make sure the converted copy exists before timing a cached load
    start = time.perf_counter()
    loaded = load_model(spec)
    print(f"smollm2-135m load from cache: {time.perf_counter() - start:.2f} s")
    windows = eval_windows("wikitext2", loaded.tokenizer, seqlen, windows_n).input_ids
    tokens = windows.numel()
    print(f"protocol: wikitext2 test, {windows.shape[0]} windows x {seqlen} tokens, batch {batch_size}, "
          f"torch threads {torch.get_num_threads()}, device {loaded.device.type}")
    ours_s, plain_s = [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
        ours = perplexity(loaded.model, loaded.architecture, windows.to(loaded.device), batch_size)
        ours_s.append(ours.seconds)
        plain_ppl, seconds = plain_transformers_ppl(loaded.model, windows.to(loaded.device), batch_size)
        plain_s.append(seconds)
    best_ours, best_plain = min(ours_s), min(plain_s)
    print(f"quantlab evaluator : ppl {ours.value:.4f}, best of {repeats}: {best_ours:.2f} s, {tokens / best_ours:.0f} tokens/s")
    print(f"plain transformers : ppl {plain_ppl:.4f}, best of {repeats}: {best_plain:.2f} s, {tokens / best_plain:.0f} tokens/s")
    print(f"throughput ratio (quantlab / plain): {best_plain / best_ours:.3f}  (target >= 0.95)")


def bench_gptq(nsamples: int, seqlen: int, batch_size: int) -> None:
    """GPTQ W4 g128 on SmolLM2-135M: where the time goes, against one full-precision forward pass
    of the decoder over the same calibration set, and the memory it adds."""
    from quantlab.experiments.data.calibration import CalibrationSpec, calibration_samples
    from quantlab.experiments.models.loading import ModelSpec, load_model
    from quantlab.experiments.records.record import peak_rss_bytes
    from quantlab.experiments.run.pipeline import quantize_model
    from quantlab.methods.gptq import GPTQ, GPTQConfig

    loaded = load_model(ModelSpec(name="smollm2-135m", source="package_gguf", dtype="float32", device="auto"))
    model, arch, device = loaded.model, loaded.architecture, loaded.device
    model.to(device)
    calib = calibration_samples(CalibrationSpec("c4", nsamples, seqlen, 0), loaded.tokenizer)
    backbone = model.get_submodule(arch.backbone)
    with torch.no_grad():
        backbone(input_ids=calib[:batch_size].to(device), use_cache=False)  # warm-up
        start = time.perf_counter()
        for chunk in calib.split(batch_size):
            backbone(input_ids=chunk.to(device), use_cache=False)
        forward_s = time.perf_counter() - start
    rss_before = peak_rss_bytes()
    start = time.perf_counter()
    report = quantize_model(model, arch, GPTQ(GPTQConfig(bits=4, group_size=128)), calib, device, batch_size, progress=False)
    total_s = time.perf_counter() - start
    split = {
        "capture (embeddings -> block 0 inputs)": report.seconds.get("capture_s", 0.0),
        "calibration forwards (block passes to each sequential group)": sum(r.info["forward_seconds"] for r in report.layers),
        "Hessian accumulation": sum(r.info["hessian_seconds"] for r in report.layers),
        "solver": sum(r.info["solver_seconds"] for r in report.layers),
        "output recomputation (quantized block outputs)": report.seconds["block_forward_s"],
    }
    print(f"protocol: GPTQ W4 g128 (reference defaults, true-sequential), c4 calibration {nsamples} x {seqlen}, "
          f"seed 0, chunks of {batch_size}, device {device.type}, torch threads {torch.get_num_threads()}")
    print(f"one full-precision decoder forward over the calibration set: {forward_s:.1f} s")
    for what, seconds in split.items():
        print(f"  {what:62s} {seconds:7.1f} s  ({seconds / forward_s:.2f} forwards)")
    other = total_s - sum(split.values())
    print(f"  {'other (bookkeeping, weight copies)':62s} {other:7.1f} s")
    print(f"whole quantization: {total_s:.1f} s = {total_s / forward_s:.2f} full-precision forwards (target <= 3)")
    hidden = model.config.hidden_size
    activations = nsamples * seqlen * hidden * 4
    widest = max(r.shape[1] for r in report.layers)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"memory: model {model_bytes / 1e6:.0f} MB, one block's calibration activations {activations / 1e6:.0f} MB, "
          f"largest Hessian {widest * widest * 4 / 1e6:.1f} MB")
    print(f"peak RSS before quantizing {rss_before / 1e6:.0f} MB, after {peak_rss_bytes() / 1e6:.0f} MB "
          f"(+{(peak_rss_bytes() - rss_before) / 1e6:.0f} MB)")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 1e6:.0f} MB")


def bench_quickstart() -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "quantlab.experiments.run.cli", "experiment=quickstart"], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(proc.stdout[-2000:])
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(proc.returncode)
    print(f"quickstart: wall {wall:.1f} s, peak RSS {peak / 1e9:.2f} GB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m quantlab.experiments.benchmarks.evaluator", description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quickstart", action="store_true", help="also time `quantlab experiment=quickstart`")
    parser.add_argument("--gptq", action="store_true", help="also time GPTQ W4 g128 (calibration 128 x 512)")
    parser.add_argument("--only-gptq", action="store_true", help="time GPTQ alone")
    args = parser.parse_args(argv)
    if args.only_gptq:
        bench_gptq(128, 512, 8)
        return
    bench_evaluator(args.windows, args.seqlen, args.batch_size, args.repeats)
    if args.gptq:
        bench_gptq(128, 512, 8)
    if args.quickstart:
        bench_quickstart()


if __name__ == "__main__":
    main()
