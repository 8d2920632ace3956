"""Packaging: the folders at the repository root become the `quantlab` namespace.

`methods/`, `experiments/` and `kernels/` stay where the design puts them and install as
`quantlab.methods`, `quantlab.experiments` and `quantlab.kernels`; `conf/` ships as the package data
`quantlab/conf` (minus a user's own conf/local/, which only its *.example.yaml files leave). Names
that do not say which project they belong to (`kernels` is also Hugging Face's) are never installed
at the top level. Everything else is in pyproject.toml.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
SUBPACKAGES = ("methods", "experiments", "kernels")


def config_files() -> list[str]:
    """conf/'s YAML files, relative to conf/, without conf/local/'s private ones."""
    files = sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml"))
    return [f for f in files if not f.startswith("local/") or f.endswith(".example.yaml")]


setup(
    packages=["quantlab", "quantlab.conf"]
    + [f"quantlab.{name}" for name in find_packages(include=[f"{p}*" for p in SUBPACKAGES])],
    package_dir={"quantlab": "quantlab", "quantlab.conf": "conf", **{f"quantlab.{p}": p for p in SUBPACKAGES}},
    package_data={"quantlab.conf": config_files()},
)
