"""The ablation experiments (conf/experiment/ablation/): every job of each sweep composes and
validates, and each setting is repeated over three calibration seeds for quantlab-report to fold."""

import pytest
from hydra import compose, initialize_config_dir

from quantlab.experiments.run.callbacks import sweep_jobs
from quantlab.experiments.run.checks import check_run
from quantlab.experiments.run.cli import load_group_option
from quantlab.experiments.run.schema import validate
from tests.conftest import CONF_DIR

ABLATIONS = sorted(p.stem for p in (CONF_DIR / "experiment" / "ablation").glob("*.yaml"))
# what each ablation varies, as the runs' configs record it
VARIED = {
    "calib_size": lambda run: run.calib.nsamples,
    "calib_dataset": lambda run: run.calib.dataset,
    "group_size": lambda run: run.group_size,
    "damping": lambda run: run.method.damp,
}


def test_the_four_ablations_ship():
    assert ABLATIONS == sorted(VARIED)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_job_of_the_ablation_composes_and_validates(ablation):
    experiment = f"experiment=ablation/{ablation}"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        sweep = compose(config_name="config", overrides=[experiment], return_hydra_config=True)
        jobs = sweep_jobs(sweep)  # the expansion the sweep itself checks before its first job
        runs = []
        for job in jobs:
            run = validate(compose(config_name="config", overrides=job), load_group_option)
            check_run(run, job)
            runs.append(run)
    settings = {VARIED[ablation](run) for run in runs}
    assert len(settings) >= 3, settings
    # every setting is run with calibration seeds 0, 1 and 2, the rest of the config held fixed
    for setting in settings:
        seeds = sorted(run.calib.seed for run in runs if VARIED[ablation](run) == setting)
        assert seeds == [0, 1, 2], (setting, seeds)
    assert len(jobs) == 3 * len(settings)
    assert {run.method_name for run in runs} == {"gptq"} and {run.bits for run in runs} == {3}
