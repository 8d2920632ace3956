"""A finished run is reused only for the same data: resume is keyed by the content fingerprints
of the texts it read, not by their paths (a rerun with another QUANTLAB_DATA_DIR kept old numbers)."""

from quantlab.experiments.run.cli import run_from_config
from tests.conftest import compose_config
from tests.experiments.run.test_cli import TINY, isolated_cache  # noqa: F401  (a fixture)

TEXT = " = Title = \n" + " ".join(f"word{i} is here ." for i in range(300)) + "\n"


def test_a_finished_run_is_reused_only_for_the_same_data(tmp_path, isolated_cache):  # noqa: F811
    for name, text in (("a", TEXT), ("b", TEXT), ("c", TEXT.replace("word1", "other"))):
        (tmp_path / name / "wikitext2").mkdir(parents=True)
        (tmp_path / name / "wikitext2" / "wiki.test.raw").write_text(text)
    overrides = [o for o in TINY if not o.startswith("eval.ppl.datasets")] + ["eval.ppl.datasets=[wikitext2]"]
    run_dir = tmp_path / "run"

    def run(data: str) -> dict:
        return run_from_config(compose_config(*overrides, f"paths.data_dir={tmp_path / data}"), run_dir,
                               progress=False)

    first = run("a")
    assert first["status"] == "ok" and not first.get("skipped")
    assert "rows_sha256=" in first["config"]["data_fingerprints"]["eval:wikitext2"]
    assert run("b").get("skipped"), "the same text in another folder is the same data"
    third = run("c")
    assert not third.get("skipped"), "another text must not reuse the old numbers"
    assert third["config_hash"] != first["config_hash"]
    assert third["config"]["data_fingerprints"] != first["config"]["data_fingerprints"]
