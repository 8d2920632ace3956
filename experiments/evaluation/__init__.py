"""Evaluation: what a model's numbers are and how sure they are, each against the full-precision
baseline on the same windows or items.

- `perplexity.py`: perplexity on non-overlapping windows (the references' formula), per-window
  NLLs kept, with its interval; placing a model for evaluation;
- `kl.py`: KL to the baseline's token distributions and top-1 agreement, inside the perplexity pass;
- `zeroshot/`: zero-shot task accuracy through lm-eval, local or hub task definitions;
- `zeroshot_and_kl.py`: the stage a run calls for both beyond perplexity (plan, baseline, per model);
- `statistics.py`: intervals, paired deltas and the paired bootstrap;
- `onnx_runtime.py`: the ONNX Runtime backend (`method=onnx_int8`): export, quantize with ORT's
  tool, and evaluate the graph in an onnxruntime session on the same windows.
"""
