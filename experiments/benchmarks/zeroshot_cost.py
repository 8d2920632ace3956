"""What zero-shot tasks and KL cost on SmolLM2-135M: the seven paper tasks on their first
`--limit` items (time per task), and the quantized model's perplexity pass with KL to the
baseline against the same pass without it (the target: under 1.5x).

    python -m quantlab.experiments.benchmarks.zeroshot_cost [--limit 200] [--windows 4] [--top-k 64]

Offline (HF_*_OFFLINE=1, QUANTLAB_DATA_DIR set) the tasks read the local data, `hellaswag` as
`hellaswag_local`.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--windows", type=int, default=4, help="wikitext2 windows of 2048 tokens for the KL figure")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--tail-samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size")
    parser.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,lambada_openai")
    parser.add_argument("--skip-tasks", action="store_true")
    args = parser.parse_args()

    from quantlab.experiments.data.protocols import eval_windows
    from quantlab.experiments.data.sources import data_dir
    from quantlab.experiments.evaluation.kl import KLAccumulator, TopKRecorder
    from quantlab.experiments.evaluation.perplexity import perplexity
    from quantlab.experiments.evaluation.zeroshot.runner import evaluate_tasks
    from quantlab.experiments.evaluation.zeroshot.tasks import resolve_tasks
    from quantlab.experiments.models.loading import load_model
    from quantlab.experiments.run.cli import load_group_option
    from quantlab.experiments.run.pipeline import quantize_model
    from quantlab.experiments.run.schema import model_spec
    from quantlab.methods.rtn import RTN, RTNConfig

    loaded = load_model(model_spec(load_group_option("model", "smollm2-135m")))
    print(f"torch threads: {torch.get_num_threads()}, device: {loaded.device}")
    if not args.skip_tasks:
        tasks = resolve_tasks(args.tasks.split(","), data_dir().absolute(), "auto")
        total = 0.0
        for task in tasks:
            run = evaluate_tasks(loaded.model, loaded.tokenizer, [task], data_dir().absolute(), limit=args.limit,
                                 batch_size=args.batch_size)
            results, seconds = run.results, run.seconds
            total += seconds
            m = results[task.name].metrics
            print(f"{task.name:16s} {task.source:5s} n={m['n']:4d} acc={m['acc']:.3f} {seconds:7.1f} s")
        print(f"seven tasks, limit={args.limit}: {total:.1f} s")

    windows = eval_windows("wikitext2", loaded.tokenizer, 2048, args.windows).input_ids
    model, arch = loaded.model, loaded.architecture
    recorder = TopKRecorder(windows.shape[0], windows.shape[1] - 1, args.top_k, args.tail_samples)
    start = time.perf_counter()
    perplexity(model, arch, windows, 1, observer=recorder)
    record_s = time.perf_counter() - start
    quantize_model(model, arch, RTN(RTNConfig(bits=3, group_size=128)), None, loaded.device)
    plain_s, kl_s = [], []
    for _ in range(2):  # alternate, so that drifting machine load hits both alike
        start = time.perf_counter()
        perplexity(model, arch, windows, 1)
        plain_s.append(time.perf_counter() - start)
        accumulator = KLAccumulator(recorder.summary())
        start = time.perf_counter()
        perplexity(model, arch, windows, 1, observer=accumulator)
        kl_s.append(time.perf_counter() - start)
    kl = accumulator.result()
    print(f"KL (RTN W3 g128 vs baseline, {args.windows} windows, {kl['estimator']} k={args.top_k} "
          f"m={args.tail_samples}): mean {kl['mean_kl']:.4f} nats, "
          f"top-1 agreement {kl['top1_agreement']:.3f}")
    print(f"baseline pass recording the summary: {record_s:.1f} s")
    print(f"perplexity pass: {min(plain_s):.1f} s; with KL: {min(kl_s):.1f} s; ratio {min(kl_s) / min(plain_s):.2f}x")


if __name__ == "__main__":
    main()
