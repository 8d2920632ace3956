"""quantlab: post-training quantization of LLMs, as Hydra-composed runs.

Import names: `quantlab.experiments` (the CLI, models, data, evaluation, records), `quantlab.methods`
(the algorithms) and `quantlab.kernels` (weight formats); the config groups ship as `quantlab/conf`.
In a source checkout those folders sit at the repository root, beside this one (setup.py maps them
into a wheel or an editable install); here the package then reaches them through its `__path__`.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent
if not (_HERE / "experiments").is_dir() and (_HERE.parent / "experiments" / "__init__.py").is_file():
    __path__.append(str(_HERE.parent))  # noqa: F821  (a source checkout: quantlab.methods is ../methods)
