"""Real low-bit kernels on SmolLM2-135M: fp32 against RTN W4 g128 and W8 per channel in QuantLinear.

The quantized linears run on QuantLinear's fast paths (kernels/linear.py); the figures are weight
bytes, prefill and decode speed, and memory.

    python -m quantlab.experiments.benchmarks.kernels                          # fp32, w4, w8 (~3 min on 2 cores)
    python -m quantlab.experiments.benchmarks.kernels --configs fp32 w4 --decode-tokens 32 --out kernels.json
    python -m quantlab.experiments.benchmarks.kernels --configs fp32 w4 --saved w4=outputs/some-w4-run/model
    make bench BENCH=kernels BENCH_ARGS="--out kernels.json"

The parent saves W4 / W8 RTN models of SmolLM2 (save_quantized_model; `--saved CONFIG=DIR` uses a
folder saved by a run instead). Each configuration then runs in a fresh subprocess that builds its
model through `build_model` (fp32: the model as loaded; w4 / w8: load_quantized_model of the saved
folder, packed, on the fast path) and measures:
- weight bytes (`model_weight_bytes`: parameters + buffers, shared storage once) of the decoder
  linears and of the whole model, and the share of the embedding (tied to the lm_head, which
  stays fp32 in every configuration);
- prefill tokens/s: one sequence of --prefill-len tokens, logits of the last position only (what
  generate's first step computes), median of --repeats after a warm-up;
- decode tokens/s: batch 1, greedy generate with the KV cache, --decode-tokens new tokens forced
  (min = max), minus the time of the same call with one new token (the prompt's prefill and the
  first token), median of --repeats;
- the chosen path against x @ dequantize().T on every quantized linear (`consistency_check`);
- RSS after the build (steady state: every weight copied into owned memory, which drops the
  checkpoint's memory map, and freed heap handed back with malloc_trim);
- peak RSS (getrusage) of another fresh process that only loads the model and generates.
One torch thread by default (--threads; see its help).
Targets (the issue): W4 linear bytes <= 0.3x fp32, W4 decode >= 1.5x fp32 tokens/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

CONFIGS = {
    "fp32": {"bits": None, "group_size": None},
    "w4": {"bits": 4, "group_size": 128},
    "w8": {"bits": 8, "group_size": -1},
}
RESULT_TAG = "KERNELS-RESULT "
RSS_TOKENS = 16
TARGET_BYTES_RATIO = 0.3
TARGET_DECODE_SPEEDUP = 1.5


def decoder_linear_names(model: torch.nn.Module, architecture: Any) -> list[str]:
    """Full module names of every decoder linear (the ones a method quantizes)."""
    blocks = architecture.block_list(model)
    return [f"{architecture.blocks}.{i}.{name}" for i in range(len(blocks)) for name in architecture.linears]


def build_model(config: str, kernel: str, saved: str | None) -> tuple[torch.nn.Module, Any, list[str], dict]:
    """(model, tokenizer, decoder linear names, info): the only place the measured process gets
    its model. fp32: SmolLM2 as loaded; w4 / w8: the saved quantized model `saved` (written by
    `save_rtn_model`, or any save_model=true folder), loaded with load_quantized_model, which builds
    the model on the meta device: no fp32 copy of the quantized linears is ever allocated."""
    from quantlab.experiments.models.adapters import resolve_architecture
    from quantlab.experiments.models.loading import ModelSpec, load_model
    from quantlab.experiments.models.quantized import load_quantized_model

    start = time.perf_counter()
    if config == "fp32":
        loaded = load_model(ModelSpec(name="smollm2-135m", source="package_gguf"))
        model, tokenizer, architecture = loaded.model, loaded.tokenizer, loaded.architecture
    else:
        if saved is None:
            raise ValueError(f"{config}: no saved model (the parent saves one unless --saved names it)")
        model, tokenizer, _ = load_quantized_model(Path(saved), "cpu", backend="packed", kernel=kernel)
        architecture = resolve_architecture(model)
    return model, tokenizer, decoder_linear_names(model, architecture), {"build_s": time.perf_counter() - start}


def save_rtn_model(config: str, directory: Path) -> Path:
    """SmolLM2 with RTN on the AWQ-paper grid (asymmetric raw min-max, integer zero) per decoder
    linear at `config`'s bits and group size, saved as a quantized model folder."""
    from quantlab.experiments.models.loading import ModelSpec, load_model
    from quantlab.experiments.models.quantized import save_quantized_model
    from quantlab.methods.quantizer import Grid
    from quantlab.methods.rtn import round_to_nearest

    loaded = load_model(ModelSpec(name="smollm2-135m", source="package_gguf"))
    spec = CONFIGS[config]
    grid = Grid(spec["bits"], sym=False, zero_in_range=False)
    formats = {
        name: round_to_nearest(loaded.model.get_submodule(name).weight, grid, spec["group_size"])
        for name in decoder_linear_names(loaded.model, loaded.architecture)
    }
    description = {"method": "rtn", "method_config": {"bits": spec["bits"], "group_size": spec["group_size"]}}
    return save_quantized_model(loaded.model, formats, directory / config, loaded.tokenizer, description)


@torch.no_grad()
def own_tensors(model: torch.nn.Module) -> None:
    """Copy every parameter and buffer into memory the process owns. transformers maps the
    checkpoint file: its pages count in RSS only once touched, and pages RTN read stay resident
    as file pages after the fp32 linears are gone (405 MB on SmolLM2, measured). Owned copies drop
    the map, so RSS counts each configuration's weights the same way: all resident, once (a tied
    parameter is one Parameter, copied once)."""
    for param in model.parameters():
        param.data = param.data.clone()
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.clone()


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim), so that RSS after a build in
    process shows what the model holds, not the fp32 weights it was rounded from."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def current_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak RSS. On Linux, from VmHWM: getrusage's ru_maxrss survives execve, so a
    child started by a parent holding 1.3 GB reported 1.3 GB whatever it loaded (measured)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _median_seconds(fn, repeats: int, warmup=None) -> float:
    (warmup or fn)()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def measure(config: str, args: argparse.Namespace) -> dict[str, Any]:
    """Everything one configuration reports, in this (fresh) process."""
    from quantlab.kernels.linear import QuantLinear, consistency_check, model_weight_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    saved = dict(entry.split("=", 1) for entry in args.saved).get(config)
    model, tokenizer, names, info = build_model(config, args.kernel, saved)
    own_tensors(model)
    release_freed_memory()
    linears = [model.get_submodule(n) for n in names]
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    result: dict[str, Any] = {
        "config": config,
        "kernels": dict(Counter(getattr(m, "kernel", "dense fp32") for m in linears)),
        "build_s": info["build_s"],
        "rss_after_build_bytes": current_rss_bytes(),
        "model_bytes": model_weight_bytes(model),
        "linear_bytes": model_weight_bytes(linears),
        "embedding_bytes": model_weight_bytes(embedding),
        "head_tied": head is not None and head.weight.data_ptr() == embedding.weight.data_ptr(),
    }
    quantized = [(n, m) for n, m in zip(names, linears, strict=True) if isinstance(m, QuantLinear)]
    if quantized and not args.no_check:
        start = time.perf_counter()
        result["check_max_rel_error"] = max(consistency_check(m, name=n) for n, m in quantized)
        result["check_s"] = time.perf_counter() - start

    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prefill_len), generator=generator)
    prefill_s = _median_seconds(lambda: model(ids, use_cache=True, logits_to_keep=1), args.repeats)
    result["prefill_tokens_per_s"] = args.prefill_len / prefill_s

    prompt = ids[:, : args.decode_prompt_len]
    mask = torch.ones_like(prompt)
    pad = tokenizer.eos_token_id if tokenizer is not None else None

    def generate(n: int) -> torch.Tensor:
        return model.generate(
            prompt, attention_mask=mask, do_sample=False, min_new_tokens=n, max_new_tokens=n, pad_token_id=pad
        )

    first_s = _median_seconds(lambda: generate(1), args.repeats)
    total_s = _median_seconds(lambda: generate(args.decode_tokens), args.repeats, warmup=lambda: generate(8))
    result["decode_tokens_per_s"] = (args.decode_tokens - 1) / max(total_s - first_s, 1e-9)
    result["decode_total_s"] = total_s
    result["threads"] = torch.get_num_threads()
    return result


@torch.inference_mode()
def measure_peak_rss(config: str, args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of a process that only builds the model and generates (RSS_TOKENS new tokens:
    the peak is set by the weights; SmolLM2's KV cache grows by 46 KB a token)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    saved = dict(entry.split("=", 1) for entry in args.saved).get(config)
    model, tokenizer, _, _ = build_model(config, args.kernel, saved)
    prompt = torch.randint(
        0, model.config.vocab_size, (1, args.decode_prompt_len), generator=torch.Generator().manual_seed(0)
    )
    model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        min_new_tokens=RSS_TOKENS,
        max_new_tokens=RSS_TOKENS,
        pad_token_id=tokenizer.eos_token_id if tokenizer is not None else None,
    )
    return {"peak_rss_bytes": peak_rss_bytes()}


def run_child(config: str, argv: list[str], mode: str = "--child") -> dict[str, Any]:
    """One configuration in a fresh interpreter; its result is the tagged line it prints."""
    command = [sys.executable, "-m", "quantlab.experiments.benchmarks.kernels", *argv, mode, config]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(
        f"{config}: the measuring process failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
    )


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def report(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Print the table and the targets; return the targets' figures."""
    base = results.get("fp32")
    header = (
        f"{'config':6} {'kernels':16} {'linears MB':>10} {'x fp32':>6} {'model MB':>8} {'emb share':>9} "
        f"{'prefill tok/s':>13} {'decode tok/s':>12} {'x fp32':>6} {'RSS built MB':>12} {'peak RSS MB':>11} {'check err':>9}"
    )
    print(header)
    print("-" * len(header))
    for config, r in results.items():
        kernels = ",".join(f"{k}:{v}" for k, v in r["kernels"].items())
        bytes_ratio = f"{r['linear_bytes'] / base['linear_bytes']:.3f}" if base else "-"
        speedup = f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}" if base else "-"
        check = f"{r['check_max_rel_error']:.1e}" if "check_max_rel_error" in r else "-"
        print(
            f"{config:6} {kernels:16} {_mb(r['linear_bytes']):>10} {bytes_ratio:>6} {_mb(r['model_bytes']):>8} "
            f"{r['embedding_bytes'] / r['model_bytes']:>9.1%} {r['prefill_tokens_per_s']:>13.1f} "
            f"{r['decode_tokens_per_s']:>12.1f} {speedup:>6} {_mb(r['rss_after_build_bytes']):>12} "
            f"{_mb(r['peak_rss_bytes']):>11} {check:>9}"
        )
    tied = all(r["head_tied"] for r in results.values())
    print(
        f"embedding {'tied to the lm_head (counted once, fp32 everywhere)' if tied else 'and lm_head separate'}"
    )
    targets: dict[str, Any] = {}
    if base and "w4" in results:
        w4 = results["w4"]
        ratio = w4["linear_bytes"] / base["linear_bytes"]
        speedup = w4["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        targets = {
            "w4_linear_bytes_ratio": ratio,
            "w4_linear_bytes_target": TARGET_BYTES_RATIO,
            "w4_linear_bytes_met": ratio <= TARGET_BYTES_RATIO,
            "w4_decode_speedup": speedup,
            "w4_decode_speedup_target": TARGET_DECODE_SPEEDUP,
            "w4_decode_speedup_met": speedup >= TARGET_DECODE_SPEEDUP,
        }
        print(
            f"target W4 linear bytes <= {TARGET_BYTES_RATIO}x fp32: {ratio:.3f}x ({'met' if targets['w4_linear_bytes_met'] else 'NOT met'})"
        )
        print(
            f"target W4 decode >= {TARGET_DECODE_SPEEDUP}x fp32 tokens/s: {speedup:.2f}x ({'met' if targets['w4_decode_speedup_met'] else 'NOT met'})"
        )
    return targets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m quantlab.experiments.benchmarks.kernels", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument(
        "--kernel", default="auto", help="QuantLinear backend (auto, reference, int4_cpu, int8_cpu)"
    )
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--decode-prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (median)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default). 1 by default: on a shared 2-core machine two OpenMP threads "
        "next to another busy process ran SmolLM2's fp32 decode at 3-4 tok/s against 16 on one thread (measured), "
        "which would flatter the quantized kernels",
    )
    parser.add_argument(
        "--no-check", action="store_true", help="skip consistency_check on the quantized linears"
    )
    parser.add_argument(
        "--saved",
        nargs="+",
        default=[],
        metavar="CONFIG=DIR",
        help="load these saved quantized models (save_quantized_model folders) instead of RTN in process, e.g. w4=DIR",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the parent saves the W4 / W8 models (default: a temp dir)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-rss", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(RESULT_TAG + json.dumps(measure(args.child, args)), flush=True)
        return
    if args.child_rss is not None:
        print(RESULT_TAG + json.dumps(measure_peak_rss(args.child_rss, args)), flush=True)
        return

    child_argv = list(sys.argv[1:] if argv is None else argv)  # a child measures and returns
    results = {}
    start = time.perf_counter()
    saved = dict(entry.split("=", 1) for entry in args.saved)
    workdir = Path(tempfile.mkdtemp(prefix="quantlab-kernels-")) if args.workdir is None else args.workdir
    for config in args.configs:
        if config != "fp32" and config not in saved:
            saved[config] = str(save_rtn_model(config, workdir))
            print(f"{config}: saved {saved[config]} ({(Path(saved[config]) / 'weights.safetensors').stat().st_size / 1e6:.1f} MB on disk)")
    child_argv += ["--saved", *(f"{k}={v}" for k, v in saved.items())] if saved else []
    for config in args.configs:
        results[config] = {**run_child(config, child_argv), **run_child(config, child_argv, "--child-rss")}
    print(
        f"SmolLM2-135M, {platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), "
        f"{results[args.configs[0]]['threads']} threads, torch {torch.__version__}; load avg "
        f"{os.getloadavg()[0]:.1f}; RTN (asymmetric raw min-max, int zero); kernel={args.kernel}; "
        f"prefill {args.prefill_len} tokens, decode {args.decode_tokens} tokens after a {args.decode_prompt_len}-token "
        f"prompt, median of {args.repeats}"
    )
    targets = report(results)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "torch": torch.__version__,
            "args": {k: str(v) for k, v in vars(args).items()},
            "results": results,
            "targets": targets,
        }
        args.out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
