"""tools/namespace.py: the rename into the `quantlab` namespace is precise and idempotent.
namespace: skip-file (the cases below keep the old names on purpose)"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("namespace_tool", REPO / "tools" / "namespace.py")
namespace = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(namespace)

PYTHON_BEFORE = '''"""Uses `kernels.linear.QuantLinear`; see methods.md and experiments/run/cli.py."""
import methods
import experiments.run.flow
import kernels as k
from kernels import grid as grids
from methods.base import ConfigError
from . import methods as local

cmd = [sys.executable, "-m", "experiments.run.cli"]  # like `python -m experiments.benchmarks.x`
methods.get_method_class("rtn")
experiments.run.flow.load_model = None
print(f"{methods.REGISTRY} experiments.run.cli")


def f(methods, kernels):
    methods.append(1)
    return kernels.values(), methods.items
'''
PYTHON_AFTER = '''"""Uses `quantlab.kernels.linear.QuantLinear`; see methods.md and experiments/run/cli.py."""
import quantlab.methods
import quantlab.experiments.run.flow
import quantlab.kernels as k
from quantlab.kernels import grid as grids
from quantlab.methods.base import ConfigError
from . import methods as local

cmd = [sys.executable, "-m", "quantlab.experiments.run.cli"]  # like `python -m quantlab.experiments.benchmarks.x`
quantlab.methods.get_method_class("rtn")
quantlab.experiments.run.flow.load_model = None
print(f"{quantlab.methods.REGISTRY} quantlab.experiments.run.cli")


def f(methods, kernels):
    methods.append(1)
    return kernels.values(), methods.items
'''


def _package(root: Path, name: str, modules: tuple[str, ...], init: str = "") -> None:
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(init)
    for module in modules:
        (root / name / f"{module}.py").write_text("")


@pytest.fixture
def checkout(tmp_path):
    """A tiny repository with the three packages and a file of each kind the rename touches."""
    _package(tmp_path, "methods", ("base",), "from methods.base import ConfigError, get_method_class\nREGISTRY = {}\n")
    _package(tmp_path, "experiments", ())
    (tmp_path / "experiments" / "run").mkdir()
    for name in ("__init__.py", "cli.py", "flow.py"):
        (tmp_path / "experiments" / "run" / name).write_text("")
    _package(tmp_path, "kernels", ("grid", "linear"))
    (tmp_path / "experiments" / "benchmarks").mkdir()
    (tmp_path / "experiments" / "benchmarks" / "__init__.py").write_text("")
    (tmp_path / "code.py").write_text(PYTHON_BEFORE)
    (tmp_path / "config.yaml").write_text("cb:\n  _target_: experiments.run.cli.Callback  # the experiments. folder\n")
    (tmp_path / "pyproject.toml").write_text('[project.scripts]\nquantlab = "experiments.run.cli:main"\n')
    (tmp_path / "Makefile").write_text("bench:\n\tpython -m experiments.benchmarks.$(BENCH)\n")
    (tmp_path / "README.md").write_text(
        "Run experiments. Then `from methods import REGISTRY`; methods.append stays.\n"
        "```\nimport kernels\nfrom kernels.grid import x\n```\n"
    )
    notebook = {"cells": [{"cell_type": "code", "metadata": {}, "source": ["%matplotlib inline\n",
                           "from experiments.run.cli import main\n"], "outputs": [], "execution_count": None},
                          {"cell_type": "markdown", "metadata": {}, "source": ["Uses `experiments.run`."]}],
                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "nb.ipynb").write_text(json.dumps(notebook, indent=1) + "\n")
    (tmp_path / "dynamic.py").write_text('import importlib\nimportlib.import_module(f"methods.{name}")\n')
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    return tmp_path


def test_python_sources_change_only_where_a_module_is_named(checkout):
    known = namespace.known_names(checkout)
    assert {"base", "REGISTRY", "get_method_class", "ConfigError"} <= known["methods"]
    assert "append" not in known["methods"] and "items" not in known["methods"]
    assert namespace.rewrite_python(PYTHON_BEFORE, known) == PYTHON_AFTER
    assert namespace.rewrite_python(PYTHON_AFTER, known) == PYTHON_AFTER


def test_the_checkout_is_rewritten_once_and_dynamic_paths_are_reported(checkout, capsys):
    assert namespace.main(["--check", str(checkout)]) == 1
    assert (checkout / "code.py").read_text() == PYTHON_BEFORE  # --check writes nothing
    assert namespace.main([str(checkout)]) == 0
    assert (checkout / "code.py").read_text() == PYTHON_AFTER
    assert (checkout / "config.yaml").read_text().startswith("cb:\n  _target_: quantlab.experiments.run.cli.Callback  # the experiments. folder")
    assert 'quantlab = "quantlab.experiments.run.cli:main"' in (checkout / "pyproject.toml").read_text()
    assert "python -m quantlab.experiments.benchmarks.$(BENCH)" in (checkout / "Makefile").read_text()
    assert (checkout / "README.md").read_text() == (
        "Run experiments. Then `from quantlab.methods import REGISTRY`; methods.append stays.\n"
        "```\nimport quantlab.kernels\nfrom quantlab.kernels.grid import x\n```\n"
    )
    cells = json.loads((checkout / "nb.ipynb").read_text())["cells"]
    assert cells[0]["source"] == ["%matplotlib inline\n", "from quantlab.experiments.run.cli import main\n"]
    assert cells[1]["source"] == ["Uses `quantlab.experiments.run`."]
    assert "dynamic.py:2: a module path built at run time" in capsys.readouterr().err
    assert namespace.main(["--check", str(checkout)]) == 0  # a second run changes nothing


def test_this_repository_uses_the_namespace_everywhere():
    """New code written with the old import names (a merge, a habit) fails here; the fix is
    `python tools/namespace.py`."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "namespace.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
