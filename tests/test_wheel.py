"""The installed package: a wheel built from this checkout, installed into a fresh venv that cannot
see the source tree, runs a tiny-model quickstart from another directory with the configs it
carries, and leaves no top-level `kernels` for transformers to take for Hugging Face's package."""

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "quantlab", "methods", "experiments", "kernels", "conf")
QUICKSTART = [
    "model=tiny-llama", "method=rtn", "bits=4", "group_size=32", "calib=pydocs", "calib.nsamples=4",
    "calib.seqlen=64", "eval.ppl.datasets=[pydocs]", "eval.ppl.seqlen=64", "eval.ppl.max_windows=6",
]
# Run inside the venv: where quantlab and its configs come from, and what transformers detects.
PROBE = """
import importlib.util, json
import quantlab, quantlab.kernels
from quantlab.experiments.run.cli import CONF_DIR
from transformers.utils import import_utils
check = getattr(import_utils, "is_kernels_available", None)
print(json.dumps({
    "quantlab": quantlab.__file__, "kernels": quantlab.kernels.__file__, "conf": str(CONF_DIR),
    "top_level": {name: importlib.util.find_spec(name) is not None for name in ("kernels", "methods", "experiments")},
    "package_available": import_utils._is_package_available("kernels")[0],
    "is_kernels_available": None if check is None else check(),
}))
"""


def _offline_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that would put the source tree on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return dict(env, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", PYTHONNOUSERSITE="1",
                **extra)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline from a copy of the files a build reads (the checkout stays clean)."""
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist),
         str(source)], capture_output=True, text=True, timeout=600, env=_offline_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [built] = dist.glob("quantlab-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel; this environment's third-party packages are reachable
    through a .pth file, which adds their folder without running its .pth files (so an editable
    quantlab there does not leak the source tree in)."""
    project = tmp_path_factory.mktemp("project")  # a user's git repository keeping its venv inside
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(project)]
    subprocess.run([*git, "init", "-q"], check=True, timeout=60)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "a project"], check=True, timeout=60)
    root = project / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=300)
    python = root / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, env=_offline_env()).stdout.strip()
    (Path(own) / "third_party.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=600, env=_offline_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


def test_the_wheel_carries_the_configs_under_the_quantlab_name_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"quantlab", wheel.name.split("-py")[0] + ".dist-info"}
    for member in ("quantlab/conf/config.yaml", "quantlab/conf/model/tiny-llama.yaml", "quantlab/conf/method/gptq.yaml",
                   "quantlab/kernels/__init__.py", "quantlab/methods/base.py", "quantlab/experiments/run/cli.py"):
        assert member in names
    conf = {n.removeprefix("quantlab/conf/") for n in names if n.startswith("quantlab/conf/")}
    assert conf == {p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")
                    if p.parent.name != "local" or p.name.endswith(".example.yaml")}


def test_transformers_sees_no_kernels_package_and_quantlab_imports_from_the_venv(venv, tmp_path):
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", PROBE], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=_offline_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("quantlab", "kernels", "conf"):
        assert Path(found[key]).is_relative_to(venv), (key, found[key])  # not the source tree
    assert (Path(found["conf"]) / "config.yaml").is_file()
    assert found["top_level"] == {"kernels": False, "methods": False, "experiments": False}
    assert found["package_available"] is False and found["is_kernels_available"] in (False, None)


def test_a_quickstart_runs_from_another_directory(venv, tmp_path, data_dir):
    proc = subprocess.run(
        [str(venv / "bin" / "quantlab"), *QUICKSTART, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, env=_offline_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "ok" and record["model"]["name"] == "tiny-llama"
    assert record["metrics"]["ppl"]["pydocs"]["value"] > 0
    assert record["git_commit"] is None  # not the commit of the project the venv sits in
