"""The store: what is computed once per machine and reused by every run, keyed by a hash of what
determines it, in one shared cache folder (`paths.cache_dir`: $QUANTLAB_CACHE_DIR, else
~/.cache/quantlab).

- `cache.py`: the content-addressed cache itself: atomic writes, one computation per key under a
  file lock, validation on every read, the events log (`computations`, `read_events`);
- `shared_inputs.py`: what runs share through it: tokenized evaluation windows, calibration sets,
  the inputs of block 0 (their keys and `*_VERSION`s);
- `artifacts.py`: quantized models, saved once per quantization key and reloaded by any run that
  would compute the same weights.

Other stages keep their own entries here too (baseline perplexities and zero-shot outputs, the KL
summary, converted model copies, ONNX exports); the keys live beside the code that computes them.
"""
