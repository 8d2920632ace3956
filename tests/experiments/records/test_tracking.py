import json

from quantlab.experiments.records.tracking import flatten
from quantlab.experiments.run.cli import run_from_config
from tests.conftest import compose_config
from tests.experiments.run.test_cli import TINY


def test_flatten_uses_slashes_not_dots():
    assert flatten({"method": {"name": "rtn", "grid": {"bits": 4}}}) == {"method/name": "rtn", "method/grid/bits": 4}


def test_offline_wandb_mirrors_the_run_without_an_account(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    run_dir = tmp_path / "run"
    record = run_from_config(compose_config(*TINY, "logger=wandb"), run_dir, progress=False)
    assert record["status"] == "ok"
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1, "one offline wandb run inside the run directory"
    assert any(offline_runs[0].rglob("*.wandb")), "the run's data file was written"
    assert json.loads((run_dir / "result.json").read_text())["status"] == "ok"


def test_wandb_run_is_finished_when_the_run_fails(tmp_path, monkeypatch):
    import pytest
    import wandb

    import quantlab.experiments.run.flow

    def broken_load(*args, **kwargs):
        raise RuntimeError("the model could not be loaded")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(quantlab.experiments.run.flow, "load_model", broken_load)
    with pytest.raises(RuntimeError, match="could not be loaded"):
        run_from_config(compose_config(*TINY, "logger=wandb"), tmp_path / "run", progress=False)
    assert wandb.run is None, "the failed run's tracker was finished"
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "failed" and "could not be loaded" in record["error"]


def test_a_wandb_error_warns_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    """README: tracking never fails a run (logger.project="a/b" made wandb.init raise)."""
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError(f"Invalid project name {kwargs['project']!r}: cannot contain '/'")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", refuse)
    record = run_from_config(compose_config(*TINY, "logger=wandb", "logger.project=a/b"), tmp_path / "run",
                             progress=False)
    assert record["status"] == "ok"
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "ok"
    assert "wandb could not start" in caplog.text and "a/b" in caplog.text
