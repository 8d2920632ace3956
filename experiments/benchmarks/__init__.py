"""Benchmarks: figures, not tests. Each module runs as `make bench BENCH=<module>` (or
`python -m quantlab.experiments.benchmarks.<module>`) and prints what it measured, with the protocol;
`evaluator` (the perplexity evaluator's throughput, GPTQ's cost, the quickstart) is the default."""
