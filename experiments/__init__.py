"""quantlab's orchestration: everything around the methods (methods/) and weight formats (kernels/),
one sub-package per stage of the flow, each opening with a docstring that says what it owns.

- `run/`: the run, from the command line to a finished record: the `quantlab` CLI, config schema,
  checks and preflight, the single-run flow, the block-by-block calibration driver, sweep callbacks;
- `models/`: loading models and tokenizers, architecture tables, quantized models on disk;
- `data/`: datasets, perplexity windows and calibration samples;
- `evaluation/`: perplexity, KL to the baseline, zero-shot tasks, statistics, the ONNX Runtime backend;
- `records/`: the run record (`result.json`), its wandb mirror, and reports over many records
  (`quantlab-report`);
- `store/`: the content-addressed cache shared by runs, what runs share through it, saved quantized
  models;
- `export/`: a saved quantized model written in other projects' formats (`quantlab-export`);
- `benchmarks/`: `make bench`, figures rather than tests.

The Python API (experiments/api.py) is importable from here: `from quantlab.experiments import quantize,
perplexity, save, load` (loaded on first use, so the CLI's light modules do not import torch for it).
"""

API = ("QuantizationReport", "load", "perplexity", "quantize", "save")


def __getattr__(name: str):
    if name in API:
        from quantlab.experiments import api

        return getattr(api, name)
    raise AttributeError(f"module 'experiments' has no attribute {name!r}")
