"""The run: from a command line to a finished record, one run or a sweep.

- `cli.py`: `quantlab`, the Hydra app (one run, or a sweep with -m) and the user-facing errors;
  `overrides.py`: the command line's mistyped keys and options, named with the closest valid one;
- `schema.py`: typed config groups, validated before anything heavy loads; `checks.py`: what the
  types cannot say (top-level keys, devices, shapes, methods); `preflight.py`: every data file the
  run reads, resolved and checked before the model loads;
- `flow.py`: one run as data flows: load, baseline, calibrate, quantize, evaluate, record;
- `pipeline.py`: the block-by-block calibration driver that hands a method one decoder block;
- `callbacks.py`: Hydra callbacks (a sweep's jobs checked first, its index.csv; a refused run's
  directory removed);
- `allocation_files.py`: SliM-LLM's per-group bit allocations read from and written to disk.
"""
