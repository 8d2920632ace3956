"""What a sweep's shared caches save: one `quantlab -m` multirun of methods x bits against the same
runs made one at a time as separate `quantlab` processes, each with its own empty cache
(QUANTLAB_CACHE_DIR), so that nothing is shared: every run converts the GGUF model, tokenizes the
evaluation text, draws the calibration set, captures block 0's inputs and evaluates the fp16
baseline itself. The multirun starts from an empty cache too, and pays for each of those once.

    python -m quantlab.experiments.benchmarks.sweep_cost                         # rtn,gptq,awq x 2,3,4 on SmolLM2, eval=quick
    python -m quantlab.experiments.benchmarks.sweep_cost --methods rtn,gptq --bits 3,4 --calib-nsamples 32

Prints both wall times, their ratio (the issue's target: below 0.7) and checks that both ways give
the same perplexities. Writes <workdir>/sweep_cost.json. Needs QUANTLAB_DATA_DIR (the offline
data) unless calib/eval use pydocs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SWEEP_NAME = "sweep_cost"


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--methods", type=_csv, default=["rtn", "gptq", "awq"], help="default: rtn,gptq,awq")
    parser.add_argument("--bits", type=_csv, default=["2", "3", "4"], help="default: 2,3,4")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--eval", default="quick", help="eval config group (default: quick)")
    parser.add_argument(
        "--max-windows",
        type=int,
        default=None,
        help="eval.ppl.max_windows (default: the eval group's, 40 for quick)",
    )
    parser.add_argument("--calib", default="c4", help="calibration dataset (default: c4)")
    parser.add_argument("--calib-nsamples", type=int, default=128)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary directory")
    parser.add_argument(
        "--extra",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="more overrides for every run, e.g. eval.ppl.seqlen=512",
    )
    parser.add_argument(
        "--sweep-extra",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides for the multirun only, e.g. hydra/launcher=joblib hydra.launcher.n_jobs=2",
    )
    parser.add_argument(
        "--keep-caches",
        action="store_true",
        help="keep the separate runs' caches (each holds a converted model: ~0.5 GB for SmolLM2)",
    )
    return parser


def _common(args: argparse.Namespace) -> list[str]:
    overrides = [
        f"model={args.model}",
        f"eval={args.eval}",
        f"calib={args.calib}",
        f"calib.nsamples={args.calib_nsamples}",
        f"calib.seqlen={args.calib_seqlen}",
    ]
    if args.max_windows is not None:
        overrides.append(f"eval.ppl.max_windows={args.max_windows}")
    return overrides + list(args.extra)


def _quantlab(overrides: list[str], cache: Path, output: Path, log: Path) -> float:
    """Run `quantlab` in a fresh process; the wall time, from process start to exit."""
    env = dict(os.environ, QUANTLAB_CACHE_DIR=str(cache), QUANTLAB_OUTPUT_DIR=str(output))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(
            [sys.executable, "-m", "quantlab.experiments.run.cli", *overrides],
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"sweep_cost: quantlab {' '.join(overrides)} failed (exit {done.returncode}); see {log}")
    return seconds


def _perplexities(root: Path) -> dict[tuple[str, str], dict[str, float]]:
    """(method, bits) -> perplexity per dataset, from every result.json under root."""
    found = {}
    for path in root.rglob("result.json"):
        record = json.loads(path.read_text())
        if record["status"] != "ok":
            sys.exit(f"sweep_cost: {path} is not ok: {record.get('error')}")
        key = (record["method"], str(record["config"]["bits"]))
        found[key] = {ds: m["value"] for ds, m in record["metrics"]["ppl"].items()}
    return found


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="quantlab-sweep-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    common = _common(args)
    grid = [(method, bits) for method in args.methods for bits in args.bits]
    print(
        f"sweep_cost: {len(args.methods)} methods x {len(args.bits)} bits = {len(grid)} runs; {' '.join(common)}"
    )
    print(f"work dir: {work}")

    sweep = [
        "-m",
        *common,
        f"method={','.join(args.methods)}",
        f"bits={','.join(args.bits)}",
        f"sweep_name={SWEEP_NAME}",
        *args.sweep_extra,
    ]
    shared_s = _quantlab(
        sweep, _fresh(work / "shared-cache"), _fresh(work / "shared-out"), work / "shared.log"
    )
    print(f"one multirun, shared caches: {shared_s:.1f} s")

    separate: dict[str, float] = {}
    out = _fresh(work / "separate-out")
    for index, (method, bits) in enumerate(grid):
        cache = _fresh(work / f"separate-cache-{index}")
        seconds = _quantlab(
            [*common, f"method={method}", f"bits={bits}"], cache, out, work / f"separate-{index}.log"
        )
        if not args.keep_caches:
            shutil.rmtree(cache, ignore_errors=True)
        separate[f"{method} W{bits}"] = seconds
        print(f"  separate {method} W{bits}: {seconds:.1f} s")
    separate_s = sum(separate.values())
    ratio = shared_s / separate_s

    shared_ppl, separate_ppl = _perplexities(work / "shared-out"), _perplexities(out)
    if set(shared_ppl) != set(separate_ppl) or len(shared_ppl) != len(grid):
        sys.exit(f"sweep_cost: runs differ: shared {sorted(shared_ppl)}, separate {sorted(separate_ppl)}")
    worst = max(abs(shared_ppl[k][ds] / separate_ppl[k][ds] - 1) for k in shared_ppl for ds in shared_ppl[k])

    print()
    print("| runs | one multirun, shared caches (s) | separate processes, no shared cache (s) | ratio |")
    print("|---|---|---|---|")
    print(f"| {len(grid)} | {shared_s:.1f} | {separate_s:.1f} | {ratio:.3f} |")
    print(f"ratio target < 0.7: {'met' if ratio < 0.7 else 'NOT met'}")
    print(f"largest relative perplexity difference between the two ways: {worst:.2e}")
    summary = {
        "runs": [f"{m} W{b}" for m, b in grid],
        "overrides": common,
        "sweep_extra": args.sweep_extra,
        "shared_s": shared_s,
        "separate_s": separate_s,
        "separate_runs_s": separate,
        "ratio": ratio,
        "max_rel_ppl_diff": worst,
        "perplexities": {f"{m} W{b}": v for (m, b), v in shared_ppl.items()},
    }
    (work / "sweep_cost.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"summary: {work / 'sweep_cost.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
