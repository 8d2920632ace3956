"""Zero-shot task accuracy through lm-eval: which task definition each name runs (`tasks.py`), the
local data files read into the hub's fields (`local_data.py`), the evaluation on the in-memory model
(`runner.py`), one run's zero-shot stage (`stage.py`), and the parity reference (`parity.py`)."""
