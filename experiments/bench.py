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
    from experiments.data.protocols import eval_windows
    from experiments.evaluate import perplexity
    from experiments.models.loading import ModelSpec, load_model

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


def bench_quickstart() -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "experiments.cli", "experiment=quickstart"], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(proc.stdout[-2000:])
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(proc.returncode)
    print(f"quickstart: wall {wall:.1f} s, peak RSS {peak / 1e9:.2f} GB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quickstart", action="store_true", help="also time `quantlab experiment=quickstart`")
    args = parser.parse_args(argv)
    bench_evaluator(args.windows, args.seqlen, args.batch_size, args.repeats)
    if args.quickstart:
        bench_quickstart()


if __name__ == "__main__":
    main()
