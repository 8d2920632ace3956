"""Evidence that the local task definitions reproduce lm-eval's own on SmolLM2-135M: per-item
results (doc ids, acc, acc_norm, each choice's log-likelihood) on the first `--limit` items of six
tasks, ours against lm-eval's built-in YAML pointed at the same data in the hub's fields.

    python -m quantlab.experiments.benchmarks.zeroshot_parity [--limit 100]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()

    from quantlab.experiments.data.sources import data_dir
    from quantlab.experiments.evaluation.zeroshot.parity import compare_on_model
    from quantlab.experiments.models.loading import load_model
    from quantlab.experiments.run.cli import load_group_option
    from quantlab.experiments.run.schema import model_spec

    loaded = load_model(model_spec(load_group_option("model", "smollm2-135m")))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        compared = compare_on_model(loaded.model, loaded.tokenizer, data_dir().absolute(), Path(folder), args.limit,
                                    args.batch_size)
    for task, entry in compared.items():
        print(f"{task:16s} n={entry['n']:4d} identical={entry['identical']} acc={entry['acc']:.3f} "
              f"reference acc={entry['reference_acc']:.3f}")
    print(f"all identical: {all(e['identical'] for e in compared.values())} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
