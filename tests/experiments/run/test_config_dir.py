"""A user's own config dir (--config-dir, hydra.searchpath): options it adds are found wherever a run
borrows another option of a group (a random model's tokenizer, compare_with), not only by Hydra's
defaults list."""

import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from quantlab.experiments.run.cli import CONF_DIR, load_group_option
from quantlab.experiments.run.schema import validate
from quantlab.methods.base import ConfigError
from tests.conftest import run_quantlab
from tests.experiments.run.test_cli import TINY


@pytest.fixture
def user_conf(tmp_path):
    """A config dir of a user's own: a method option (RTN, symmetric), a random model, and the model
    it borrows its tokenizer from, none of them in quantlab's conf/."""
    root = tmp_path / "my_conf"
    (root / "method").mkdir(parents=True)
    (root / "model").mkdir()
    (root / "method" / "rtn_sym.yaml").write_text(
        "name: rtn\nbits: ${bits}\ngroup_size: ${group_size}\nsym: true\nzero_in_range: false\nfloat_zero: false\n"
    )
    (root / "model" / "my-tokenizer.yaml").write_text((CONF_DIR / "model" / "smollm2-135m.yaml").read_text())
    tiny = (CONF_DIR / "model" / "tiny-llama.yaml").read_text()
    assert "tokenizer: smollm2-135m" in tiny
    (root / "model" / "my-tiny.yaml").write_text(
        tiny.replace("name: tiny-llama", "name: my-tiny").replace("tokenizer: smollm2-135m", "tokenizer: my-tokenizer")
    )
    return root


def test_an_option_outside_the_search_path_is_named_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"'rtn_sym' names no option of config group 'method' \(did you mean 'rtn'\?\); valid: awq, .*rtn"):
        load_group_option("method", "rtn_sym")


def test_hydra_searchpath_options_are_found_by_borrowing_lookups(user_conf, monkeypatch):
    overrides = [f"hydra.searchpath=[file://{user_conf}]", "model=my-tiny", "compare_with=[rtn_sym]"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", cfg)  # what a running app sees
    assert load_group_option("model", "my-tokenizer").source == "package_gguf"
    job = cfg.copy()
    with open_dict(job):
        del job["hydra"]  # the job's config, as the app hands it over
    run = validate(job, load_group_option)
    [(name, method)] = run.comparisons
    assert name == "rtn" and method.sym is True
    with pytest.raises(ConfigError, match=r"valid: .*my-tiny, my-tokenizer"):
        load_group_option("model", "nowhere")


def test_a_run_with_config_dir_uses_the_users_options(tmp_path, user_conf, data_dir):
    proc = run_quantlab(
        "--config-dir", str(user_conf), *[o for o in TINY if not o.startswith("model=")], "model=my-tiny",
        "compare_with=[rtn_sym]", f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "ok" and record["config"]["model"]["name"] == "my-tiny"
    [rtn_sym] = record["comparisons"]
    assert rtn_sym["method"] == "rtn"
    assert rtn_sym["metrics"]["ppl"]["pydocs"]["value"] != record["metrics"]["ppl"]["pydocs"]["value"]
