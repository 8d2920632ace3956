"""Records: what a run leaves behind and everything that reads it back.

- `record.py`: the run record, `result.json` (written atomically at the start as `failed`, then as
  `ok` or `failed` with the error), and the config hash and versions it carries;
- `tracking.py`: the optional Weights & Biases mirror of the record (never fails the run);
- `reporting/`: tables, plots and summaries over many records (`quantlab-report`, notebooks,
  the quickstart's closing table).
"""
