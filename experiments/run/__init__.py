"""The run: from a command line to a finished record, one run or a sweep.

- `cli.py`: `quantlab`, the Hydra app (one run, or a sweep with -m) and the user-facing errors;
- `schema.py`: typed config groups, validated before anything heavy loads; `checks.py`: what the
  types cannot say (top-level keys, devices, shapes, methods); `preflight.py`: every data file the
  run reads, resolved and checked before the model loads;
- `flow.py`: one run as data flows: load, baseline, calibrate, quantize, evaluate, record;
- `pipeline.py`: the block-by-block calibration driver that hands a method one decoder block;
- `callbacks.py`: Hydra sweep callbacks (every job checked first, the sweep's index.csv);
- `allocation_files.py`: SliM-LLM's per-group bit allocations read from and written to disk.
"""
