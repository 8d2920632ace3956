"""Every config composes and validates; bad configs fail before anything loads, with a message
that names the problem and the valid choices."""

from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from quantlab.experiments.run.checks import check_run
from quantlab.experiments.run.cli import CONF_DIR, load_group_option
from quantlab.experiments.run.schema import validate
from quantlab.methods.base import ConfigError
from tests.conftest import compose_config


def options(group: str) -> list[str]:
    return sorted(str(p.relative_to(CONF_DIR / group).with_suffix("")) for p in (CONF_DIR / group).rglob("*.yaml"))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_validates(experiment):
    run = validate(compose_config(f"experiment={experiment}"), load_group_option)
    check_run(run, [f"experiment={experiment}"])  # the checks beyond the schema refuse none of ours
    assert run.method_name and run.eval.ppl.datasets


@pytest.mark.parametrize(
    ("group", "choice"),
    [(g, c) for g in ("model", "method", "calib", "eval", "logger", "export", "act", "observer", "rules", "kv")
     for c in options(g)
     # these need their own key (model.path, calib.path, calib.dataset): tested with it
     if (g, c) not in (("model", "quantized"), ("calib", "custom"), ("calib", "hf"))],
)
def test_every_group_option_validates(group, choice):
    # an observer is refused unless static ranges use it
    overrides = [f"{group}={choice}", *(["act=int8_static"] if group == "observer" else [])]
    run = validate(compose_config(*overrides), load_group_option)
    check_run(run, overrides)
    assert run is not None


def test_a_saved_model_needs_its_folder():
    with pytest.raises(ConfigError, match="model.path"):
        validate(compose_config("model=quantized"), load_group_option)


def test_top_level_bits_and_group_size_reach_the_method():
    run = validate(compose_config("method=rtn", "bits=3", "group_size=-1"), load_group_option)
    assert (run.method.bits, run.method.group_size) == (3, -1)


def test_unknown_choice_lists_the_valid_ones():
    with pytest.raises(MissingConfigException) as error:
        compose_config("method=nope")
    assert "rtn" in str(error.value) and "fp16" in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["bits=1"], r"method 'rtn' cannot quantize to bits=1; valid: 2, 3, 4, 5, 6, 7, 8"),
        (["group_size=0"], r"group_size=0 is invalid"),
        (["+method.damp=0.1"], r"method.damp is not a key of method=rtn. Valid keys of method=rtn: bits, "),
        (["method.sym=maybe"], r"config group 'method/rtn'"),
        (["eval.ppl.datasets=[wikitext3]"], r"wikitext3.*choose one of: wikitext2"),
        (["calib.nsamples=0"], r"calib.nsamples=0 must be a positive integer"),
        (["calib.dataset=imagenet"], r"calib.dataset='imagenet' is not valid"),
        (["model.source=ftp"], r"model.source='ftp' is not valid; choose one of: hub"),
        (["model.dtype=float8"], r"model.dtype='float8'"),
        (["+model.colour=red"], r"model.colour is not a key of model. Valid keys of model: device, "),
    ],
)
def test_bad_configs_fail_with_a_clear_message(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(*overrides), load_group_option)


def test_gitignored_local_overrides_are_optional():
    assert (CONF_DIR / "local").is_dir()
    assert OmegaConf.select(compose_config(), "model.name") == "smollm2-135m"


def test_hub_models_name_their_ids():
    for name in ("opt-125m", "llama2-7b", "llama3-8b", "qwen2.5-0.5b"):
        spec = OmegaConf.load(Path(CONF_DIR / "model" / f"{name}.yaml"))
        assert spec.source == "hub" and "/" in spec.path
