"""calib=custom through a whole GPTQ run on a tiny random llama: the same windows as the built-in
text it was written from, caches shared by content across paths, and the source in the record."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from quantlab.experiments.data.sources import load_rows
from quantlab.experiments.records.reporting.records import calib_label
from quantlab.experiments.run.cli import run_from_config
from tests.conftest import compose_config
from tests.experiments.run.test_cli import TINY
from tests.experiments.store.test_artifacts import cache, ppl  # noqa: F401, F811  (the private-cache fixture; a record's perplexities)

BASE = [t for t in TINY if t != "calib=pydocs"] + ["method=gptq"]


def events(root, kind: str) -> list[str]:
    lines = (root / "events.jsonl").read_text().splitlines()
    return [e["event"] for e in map(json.loads, lines) if e["kind"] == kind]


def test_gptq_on_a_custom_file_equals_the_builtin_text_and_shares_caches_by_content(tmp_path, cache):  # noqa: F811
    rows = load_rows("pydocs", "train")
    jsonl = tmp_path / "pydocs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows), encoding="utf-8")
    moved = tmp_path / "elsewhere" / "pydocs.parquet"
    moved.parent.mkdir()
    pq.write_table(pa.table({"text": rows}), moved)

    builtin = run_from_config(compose_config(*TINY, "method=gptq"), tmp_path / "builtin", progress=False)
    # pydocs draws from its rows joined with "\n\n": calib.join=paragraph is that rule
    first = run_from_config(compose_config(*BASE, "calib=custom", f"calib.path={jsonl}", "calib.join=paragraph"),
                            tmp_path / "custom", progress=False)
    assert first["status"] == "ok"
    assert ppl(first) == ppl(builtin)  # the same windows, so the same quantized model
    calib = first["calib"]
    assert calib["source"] == {"kind": "custom", "path": str(jsonl), "format": "jsonl", "field": "text"}
    assert calib["dataset"] == "custom" and calib["join"] == "\n\n" and calib["n_sequences"] == 4
    assert calib["variant"].startswith(f"custom:docs={len(rows)}:rows_sha256=")
    assert calib["variant"].endswith(builtin["calib"]["variant"].rsplit("=", 1)[1])  # the same content hash
    assert first["config"]["data_fingerprints"]["calib"] == calib["variant"]
    # reports pair runs by calib_dataset: a custom text is named with its content hash
    assert calib_label(builtin["calib"]) == "pydocs"
    assert calib_label(calib) == "custom:" + calib["variant"].rsplit("=", 1)[1]

    again = run_from_config(compose_config(*BASE, "calib=custom", f"calib.path={moved}", "calib.join=paragraph"),
                            tmp_path / "moved", progress=False)
    # pydocs, the file, the moved file: the quantized model is reused, so no calibration is drawn
    assert events(cache, "quantized") == ["compute", "compute", "hit"]
    assert events(cache, "calibration") == ["compute", "compute"]
    assert again["calib"]["source"] == {"kind": "custom", "path": str(moved), "format": "parquet", "field": "text"}
    assert again["config_hash"] == first["config_hash"] and ppl(again) == ppl(first)


def test_chat_template_run_records_the_template(tmp_path, cache):  # noqa: F811
    path = tmp_path / "chat.jsonl"
    conversation = [{"role": "user", "content": "What is a quantizer? " * 4},
                    {"role": "assistant", "content": "It maps weights onto a grid. " * 4}]
    path.write_text("".join(json.dumps({"messages": conversation, "n": i}) + "\n" for i in range(8)))
    record = run_from_config(
        compose_config(*BASE, "calib=custom", f"calib.path={path}", "calib.field=messages",
                       "calib.chat_template=true", "calib.join=newline"),
        tmp_path / "chat", progress=False,
    )
    assert record["status"] == "ok"
    assert record["calib"]["chat_template"].startswith("string: one user turn")
    assert len(record["calib"]["chat_template_sha256"]) == 16
