"""Calibration on any text: calib=custom (a file) and calib=hf (a hub dataset).

The same documents in every format; the same windows as the built-in texts where the rules
coincide; fingerprints that follow the content, not the path; every refusal before the model
loads; and the chat template."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from quantlab.experiments.data import hub
from quantlab.experiments.data.calibration import (
    CalibrationSpec,
    calibration_fingerprint,
    calibration_samples,
    calibration_set,
    calibration_source,
    join_separator,
)
from quantlab.experiments.data.custom import (
    CalibrationTextError,
    TextSource,
    documents_hash,
    resolve_documents,
    text_documents,
)
from quantlab.experiments.data.sources import TextTooShort, load_rows
from quantlab.experiments.run.preflight import DataError, check_calibration_text
from quantlab.experiments.run.schema import CalibConfig, validate
from quantlab.experiments.store.shared_inputs import cached_calibration_set, calibration_key
from quantlab.methods.base import ConfigError
from tests.conftest import compose_config
from tests.experiments.data.conftest import CharTokenizer

# Documents with single newlines inside (a blank line would split a .txt document), accents, quotes.
DOCS = [f"<doc {i}> première ligne\nsecond line \"{i}\" " + "abc xyz " * (i % 7 + 3) for i in range(40)]
DOCS = [doc.strip() for doc in DOCS]


def write(path: Path, docs: list, fmt: str, field: str = "text") -> Path:
    """`docs` written as a file of format `fmt` (the inverse of each reader)."""
    if fmt == "text":
        path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    elif fmt == "lines":
        path.write_text("".join(d + "\n" for d in docs), encoding="utf-8")
    elif fmt == "jsonl":
        lines = "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs))
        if path.suffix == ".gz":
            path.write_bytes(gzip.compress(lines.encode()))
        else:
            path.write_text(lines, encoding="utf-8")
    elif fmt == "json-array":
        path.write_text(json.dumps([{field: d} for d in docs]), encoding="utf-8")
    elif fmt == "parquet":
        pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path)
    return path


def custom(path: Path, fmt: str | None = None, field: str = "text") -> TextSource:
    return TextSource("custom", path=str(path), format=fmt, field=field)


def spec_of(source: TextSource, **knobs) -> CalibrationSpec:
    dataset = source.dataset if source.kind == "hf" else "custom"
    return CalibrationSpec(dataset, source=source, **knobs)


# --- reading: every format gives the same documents -----------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt", "given"),
    [("d.txt", "text", None), ("d.md", "text", None), ("d.jsonl", "jsonl", None), ("d.json", "json-array", None),
     ("d.ndjson", "jsonl", None), ("d.jsonl.gz", "jsonl", None), ("d.parquet", "parquet", None),
     ("d.data", "jsonl", "jsonl"), ("d.txt", "lines", "lines")],
)
def test_every_format_reads_the_same_documents(tmp_path, name, fmt, given):
    docs = [d.replace("\n", " ") for d in DOCS] if fmt == "lines" else DOCS
    resolved = resolve_documents(custom(write(tmp_path / name, docs, fmt), given))
    assert resolved.rows == docs
    reference = resolve_documents(custom(write(tmp_path / "ref.jsonl", docs, "jsonl")))
    assert resolved.variant == reference.variant  # the content, not the file, names the text
    assert resolved.variant.startswith(f"custom:docs={len(docs)}:rows_sha256=")


def test_text_documents_are_blocks_between_blank_lines_stripped():
    text = "\n\n  first doc\nstill first  \n \t\n\n\nsecond\r\n\n   \n\nthird\n"
    assert text_documents(text.replace("\r\n", "\n")) == ["first doc\nstill first", "second", "third"]


def test_crlf_files_read_as_universal_newlines(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(b"one\r\ntwo\r\n\r\nthree\r\n")
    assert resolve_documents(custom(path)).rows == ["one\ntwo", "three"]


def test_jsonl_values_are_kept_as_they_are(tmp_path):
    rows = ["", " = Title = \n", "", " body text \n"]  # wikitext-style rows: blanks and edge spaces kept
    assert resolve_documents(custom(write(tmp_path / "w.jsonl", rows, "jsonl"))).rows == rows


def test_field_names_another_column(tmp_path):
    path = write(tmp_path / "d.parquet", DOCS, "parquet", field="content")
    assert resolve_documents(custom(path, field="content")).rows == DOCS


# --- sampling: the built-in rules on the same text give the same windows ----------------------


def c4_docs(n: int = 60) -> list[str]:
    rng = random.Random(4)
    return [f"<{i}>" + "".join(rng.choice("ab cd") for _ in range(rng.randint(10, 150))) for i in range(n)]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "text"])
@pytest.mark.parametrize("sampling", ["gptq", "awq"])
def test_c4_train_half_as_a_file_gives_calib_c4s_windows(fake_data, put_c4, tokenizer, tmp_path, fmt, sampling):
    docs = [d.strip() for d in c4_docs()]
    put_c4(docs)
    train = load_rows("c4", "train")
    assert train == docs[30:]
    path = write(tmp_path / f"c4.{ {'text': 'txt'}.get(fmt, fmt) }", train, fmt)
    knobs = dict(nsamples=12, seqlen=40, seed=3, sampling=sampling)
    expected = calibration_samples(CalibrationSpec("c4", **knobs), tokenizer)
    assert torch.equal(calibration_samples(spec_of(custom(path), **knobs), tokenizer), expected)
    other_seed = calibration_samples(spec_of(custom(path), **{**knobs, "seed": 4}), tokenizer)
    assert not torch.equal(other_seed, expected)


def test_ptb_as_text_or_lines_with_paragraph_join_gives_calib_ptbs_windows(fake_data, put_file, tokenizer, tmp_path):
    original = put_file("ptb/ptb.train.txt.gz", "".join(f" sentence {i} of the treebank \n" for i in range(300)))
    rows = load_rows("ptb", "train")
    knobs = dict(nsamples=16, seqlen=64, seed=5)
    expected = calibration_samples(CalibrationSpec("ptb", **knobs), tokenizer)
    as_text = write(tmp_path / "ptb.txt", rows, "text")  # "\n\n".join(rows): reads back as the rows
    for source in (custom(as_text), custom(original, "lines")):
        spec = spec_of(source, join=join_separator("paragraph"), **knobs)
        assert torch.equal(calibration_samples(spec, tokenizer), expected)
        assert calibration_fingerprint(spec, "v")["join"] == calibration_fingerprint(CalibrationSpec("ptb", **knobs), "v")["join"]


def test_wikitext2_rows_as_jsonl_give_calib_wikitext2s_windows(fake_data, put_file, tokenizer, tmp_path):
    put_file("wikitext2/wiki.train.raw", "".join(f" = Section {i} = \n \n Some text {i} here . \n \n" for i in range(200)))
    rows = load_rows("wikitext2", "train")
    knobs = dict(nsamples=10, seqlen=50, seed=0)
    expected = calibration_samples(CalibrationSpec("wikitext2", **knobs), tokenizer)
    spec = spec_of(custom(write(tmp_path / "w.jsonl", rows, "jsonl")), join="\n\n", **knobs)
    assert torch.equal(calibration_samples(spec, tokenizer), expected)


def test_the_real_c4_sample_rewritten_as_jsonl_gives_the_same_windows(real_data, tokenizer, tmp_path):
    path = write(tmp_path / "c4-train.jsonl", load_rows("c4", "train"), "jsonl")
    knobs = dict(nsamples=8, seqlen=256, seed=0)
    assert torch.equal(calibration_samples(spec_of(custom(path), **knobs), tokenizer),
                       calibration_samples(CalibrationSpec("c4", **knobs), tokenizer))


def test_join_names_are_separators():
    assert [join_separator(j) for j in (None, "paragraph", "newline", "space", " | ")] == [None, "\n\n", "\n", " ", " | "]


# --- fingerprints: content, not path ----------------------------------------------------------


def test_fingerprint_follows_content_not_path_or_format(tmp_path, tokenizer):
    a = write(tmp_path / "a.jsonl", DOCS, "jsonl")
    b_dir = tmp_path / "elsewhere"
    b_dir.mkdir()
    b = write(b_dir / "b.txt", DOCS, "text")
    changed = write(tmp_path / "c.jsonl", [*DOCS[:-1], DOCS[-1] + "!"], "jsonl")
    key = {p: calibration_key(spec_of(custom(p), nsamples=4, seqlen=16), tokenizer) for p in (a, b, changed)}
    assert key[a] == key[b]
    assert key[a] != key[changed]
    assert str(a) not in json.dumps(key[a])  # no path in the key
    _, record = calibration_set(spec_of(custom(b), nsamples=4, seqlen=16), tokenizer)
    assert record["source"] == {"kind": "custom", "path": str(b), "format": "text", "field": None}
    assert record["variant"] == resolve_documents(custom(a)).variant and record["dataset"] == "custom"


def test_the_cache_entry_is_shared_across_paths_and_records_this_runs_path(tmp_path, tokenizer):
    a = write(tmp_path / "a.jsonl", DOCS, "jsonl")
    b = write(tmp_path / "b.parquet", DOCS, "parquet")
    root = tmp_path / "cache"
    ids_a, record_a, key_a = cached_calibration_set(spec_of(custom(a), nsamples=4, seqlen=16), tokenizer, root)
    ids_b, record_b, key_b = cached_calibration_set(spec_of(custom(b), nsamples=4, seqlen=16), tokenizer, root)
    events = [json.loads(line)["event"] for line in (root / "events.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "calibration"]
    assert events == ["compute", "hit"] and key_a == key_b and torch.equal(ids_a, ids_b)
    assert record_a["source"]["path"] == str(a)
    assert record_b["source"] == {"kind": "custom", "path": str(b), "format": "parquet", "field": "text"}


def test_builtin_fingerprints_have_no_source():
    assert calibration_source(CalibrationSpec("c4")) == {}


# --- errors, before the model loads ----------------------------------------------------------


def calib(path: Path | str, **knobs) -> CalibConfig:
    return CalibConfig(**{"source": "custom", "dataset": "custom", "path": str(path), "field": "text",
                          "nsamples": 4, "seqlen": 16, **knobs})


@pytest.mark.parametrize(
    ("content", "name", "knobs", "message"),
    [
        (None, "missing.jsonl", {}, r"calib.path=.*missing.jsonl: does not exist"),
        ("", "empty.txt", {}, r"empty.txt: holds no text"),
        (" \n\n \t\n", "blank.txt", {}, r"blank.txt: holds no text"),
        ('{"text": ""}\n{"text": "  "}\n', "blank.jsonl", {}, r"holds no text \(2 rows, all empty\)"),
        ('{"content": "x", "url": "u"}\n', "d.jsonl", {}, r"line 1 has no field 'text' \(its fields: 'content', 'url'\); set calib.field"),
        ('{"text": "ok"}\nnot json\n', "d.jsonl", {}, r"line 2 is not valid JSON"),
        ('["a list"]\n', "d.jsonl", {}, r"item 0 is a JSON str, not an object"),
        ('{"text": 3}\n', "d.jsonl", {}, r"row 0: field 'text' is int, not text"),
        ('{"text": null}\n', "d.jsonl", {}, r"row 0: field 'text' is null"),
        ("not parquet at all", "d.parquet", {}, r"d.parquet: cannot be read as parquet"),
        (b"\xff\xfe latin \xe9\n", "d.txt", {}, r"not UTF-8 text"),
        (gzip.compress(b'{"text": "x"}\n' * 50)[:-10], "d.jsonl.gz", {}, r"cannot be read .*truncated or damaged"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "chat.jsonl", {"field": "messages"},
         r"calib.field='messages' holds chat messages.*calib.chat_template=true"),
        ("short text\n\nanother\n", "short.txt", {"seqlen": 64},
         r"short.txt is too short for one window of 65 tokens \(its longest document has only 10 bytes, 2 documents in all\).*calib.join=paragraph"),
        ("short text\n\nanother\n", "short.txt", {"seqlen": 64, "join": "paragraph"},
         r"short.txt is too short for one window of 65 tokens \(it has only 19 bytes, 2 documents in all\)"),
        ("short\n\nlines\n", "short.txt", {"seqlen": 64, "sampling": "awq"}, r"too short for one window of 64 tokens"),
    ],
    ids=["missing", "empty", "blank", "blank-values", "no-field", "not-json", "not-object", "int", "null",
         "not-parquet", "not-utf8", "truncated-gz", "messages-without-template", "too-short-docs",
         "too-short-joined", "too-short-awq"],
)
def test_preflight_refuses_with_the_file_and_the_fix(tmp_path, content, name, knobs, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as error:
        check_calibration_text(calib(path, **knobs))
    assert str(error.value).startswith("calib=custom: ")


def test_parquet_without_the_field_names_its_columns(tmp_path):
    path = write(tmp_path / "d.parquet", DOCS, "parquet", field="body")
    with pytest.raises(DataError, match=r"has no column 'text' \(its columns: 'id', 'body'\); set calib.field"):
        check_calibration_text(calib(path))


def test_a_folder_is_not_a_file(tmp_path):
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(DataError, match="is a folder, not a file"):
        check_calibration_text(calib(tmp_path / "dir.txt"))


def test_preflight_returns_the_content_variant_and_warns_of_overlapping_windows(tmp_path):
    path = write(tmp_path / "d.jsonl", DOCS, "jsonl")
    with pytest.warns(UserWarning, match="fewer than nsamples x seqlen = 6400 tokens of text: the calibration windows overlap"):
        variant = check_calibration_text(calib(path, nsamples=100, seqlen=64, join="paragraph"))
    assert variant == resolve_documents(custom(path)).variant


def test_too_few_tokens_at_the_draw_says_how_many(tmp_path, tokenizer):
    path = write(tmp_path / "d.txt", ["tiny", "docs"], "text")
    with pytest.raises(TextTooShort, match=r"no document has > seqlen=8 tokens \(longest of all 2 documents: 4"):
        calibration_samples(spec_of(custom(path), nsamples=2, seqlen=8), tokenizer)
    with pytest.raises(TextTooShort, match=r"joined text has only 10 tokens"):
        calibration_samples(spec_of(custom(path), nsamples=2, seqlen=16, join="\n\n"), tokenizer)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["calib=custom"], r"calib=custom needs calib.path=FILE"),
        (["calib=custom", "calib.path=/x/notes.docx"], r"cannot tell its format from the suffix '.docx'.*calib.format="),
        (["calib=custom", "calib.path=/x/notes", "calib.format=csv"], r"calib.format='csv' is not a format"),
        (["calib=custom", "calib.path=/x/a.txt", "calib.dataset=c4"], r"calib.dataset stays 'custom'"),
        (["calib=custom", "calib.path=/x/a.txt", "+calib.split=train"], r"calib.split is not read with calib=custom.*calib=hf"),
        (["calib=custom", "calib.path=/x/a.txt", "calib.join=paragraph", "calib.sampling=awq"], r"calib.join applies to gptq sampling"),
        (["calib=c4", "+calib.path=/x/a.txt"], r"calib.path is not read with a built-in dataset.*calib=custom calib.path="),
        (["calib=wikitext2", "+calib.join=space"], r"calib.join is not read with a built-in dataset"),
        (["calib=c4", "calib.dataset=allenai/c4"], r"calib.dataset='allenai/c4' is not valid.*calib=hf calib.dataset=HUB_ID"),
        (["calib=hf"], r"calib=hf needs calib.dataset=ID"),
        (["calib=hf", "calib.dataset=org/set", "+calib.path=/x/a.txt"], r"calib.path is not read with calib=hf"),
        (["calib=hf", "calib.dataset=org/set", "calib.field="], r"calib.field is empty"),
        (["calib=custom", "calib.path=/x/a.txt", "calib.chat_template=maybe"], r"calib.chat_template"),
    ],
)
def test_config_errors_name_the_key_and_the_fix(overrides, message):
    from quantlab.experiments.run.cli import load_group_option

    with pytest.raises(ConfigError, match=message):
        validate(compose_config(*overrides), load_group_option)


def test_the_groups_validate_with_their_required_key(tmp_path):
    from quantlab.experiments.run.cli import load_group_option

    run = validate(compose_config("calib=custom", f"calib.path={tmp_path}/d.parquet"), load_group_option)
    assert run.calib.spec().source == TextSource("custom", path=f"{tmp_path}/d.parquet", field="text")
    run = validate(compose_config("calib=hf", "calib.dataset=org/set", "calib.config=en", "calib.join=paragraph"),
                   load_group_option)
    spec = run.calib.spec()
    assert (spec.dataset, spec.join) == ("org/set", "\n\n")
    assert spec.source == TextSource("hf", dataset="org/set", config="en", split="train", field="text")


def test_a_relative_path_is_from_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert calib("texts/d.txt").spec().source.path == str(tmp_path / "texts" / "d.txt")


# --- calib=hf -----------------------------------------------------------------------------------


class FakeHub:
    """datasets.load_dataset stand-in: records its arguments, returns a Dataset."""

    def __init__(self, columns: dict) -> None:
        self.columns, self.calls = columns, []

    def __call__(self, path, name=None, split=None, revision=None, **kwargs):
        import datasets

        self.calls.append((path, name, split, revision))
        return datasets.Dataset.from_dict(self.columns)


def hf(**knobs) -> TextSource:
    return TextSource("hf", **{"dataset": "org/corpus", "config": "en", "split": "train[:100]", **knobs})


def test_hf_loads_through_load_dataset_and_fingerprints_id_revision_and_content(monkeypatch, tokenizer):
    import datasets

    fake = FakeHub({"text": DOCS, "meta": list(range(len(DOCS)))})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    resolved = resolve_documents(hf(revision="abc123"))
    assert fake.calls == [("org/corpus", "en", "train[:100]", "abc123")]
    assert resolved.rows == DOCS
    assert resolved.variant == f"hf:org/corpus@abc123/en/train[:100]/text:rows_sha256={documents_hash(DOCS)}"
    assert resolve_documents(hf()).variant.startswith("hf:org/corpus@default/en/train[:100]/text:")
    spec = spec_of(hf(), nsamples=6, seqlen=32)
    key = calibration_key(spec, tokenizer)
    samples, record = calibration_set(spec, tokenizer)
    assert samples.shape == (6, 32)
    assert record["dataset"] == "org/corpus" and record["split"] == "train[:100]"
    assert record["source"] == {"kind": "hf", "dataset": "org/corpus", "config": "en", "split": "train[:100]",
                                "revision": None, "field": "text"}
    fake.columns = {"text": [*DOCS[:-1], "changed"], "meta": list(range(len(DOCS)))}
    assert calibration_key(spec, tokenizer) != key  # same id and split, other rows: another entry


def test_hf_missing_column_names_the_columns(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", FakeHub({"sentence": ["a"], "label": [0]}))
    with pytest.raises(CalibrationTextError, match=r"has no column 'text' \(its columns: 'sentence', 'label'\)"):
        resolve_documents(hf())


def test_hf_failure_says_offline_and_the_alternative(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"calib=hf: calib.dataset=org/corpus .*HF_DATASETS_OFFLINE=1.*calib=custom"):
        check_calibration_text(CalibConfig(source="hf", dataset="org/corpus", field="text", split="train",
                                           nsamples=4, seqlen=16))


def test_hf_reads_a_local_folder_with_the_real_load_dataset(tmp_path, tokenizer):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write(folder / "train.jsonl", DOCS, "jsonl")
    assert hub.hub_offline_reason()  # the tests run offline: this is datasets' local path
    resolved = resolve_documents(TextSource("hf", dataset=str(folder), split="train"))
    assert resolved.rows == DOCS
    knobs = dict(nsamples=6, seqlen=32, seed=1)
    from_hf = calibration_samples(spec_of(TextSource("hf", dataset=str(folder), split="train"), **knobs), tokenizer)
    from_file = calibration_samples(spec_of(custom(folder / "train.jsonl"), **knobs), tokenizer)
    assert torch.equal(from_hf, from_file)


# --- the chat template --------------------------------------------------------------------------


class ChatTokenizer(CharTokenizer):
    """CharTokenizer with a chat template and a BOS it adds unless told not to."""

    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"

    def __init__(self) -> None:
        super().__init__(add_bos=True, name_or_path="chat-char")

    def apply_chat_template(self, messages, tokenize=False):
        assert not tokenize
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        self.add_bos = add_special_tokens
        return super().__call__(text, return_tensors)


def test_chat_template_wraps_strings_as_a_user_turn_and_keeps_messages(tmp_path):
    conversations = [[{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i} " * 5}]
                     for i in range(20)]
    tokenizer = ChatTokenizer()
    messages = write(tmp_path / "chat.jsonl", conversations, "jsonl", field="messages")
    spec = spec_of(custom(messages, field="messages"), nsamples=8, seqlen=40, chat_template=True, join="")
    samples = calibration_samples(spec, tokenizer)
    rendered = "".join(tokenizer.apply_chat_template(c) for c in conversations)
    assert all(tokenizer.decode(w) in rendered for w in samples)
    assert (samples != tokenizer.bos_token_id).all()  # the template's text, no BOS added on top
    # a string is one user turn: the same windows as the turns written out, tokenized without BOS
    plain = write(tmp_path / "plain.jsonl", DOCS, "jsonl")
    turns = write(tmp_path / "turns.jsonl", [f"<user>{doc}</user>" for doc in DOCS], "jsonl")
    knobs = dict(nsamples=8, seqlen=40, seed=2)
    assert torch.equal(calibration_samples(spec_of(custom(plain), chat_template=True, **knobs), tokenizer),
                       calibration_samples(spec_of(custom(turns), **knobs), CharTokenizer()))


def test_chat_template_fingerprint_holds_the_template(tmp_path):
    path = write(tmp_path / "d.jsonl", DOCS, "jsonl")
    tokenizer = ChatTokenizer()
    on = calibration_fingerprint(spec_of(custom(path), chat_template=True), "v", tokenizer)
    off = calibration_fingerprint(spec_of(custom(path)), "v", tokenizer)
    assert "chat_template" not in off and on["chat_template_sha256"]
    other = ChatTokenizer()
    other.chat_template = "{{ messages }}"
    assert calibration_fingerprint(spec_of(custom(path), chat_template=True), "v", other) != on


def test_a_tokenizer_without_a_chat_template_is_refused(tmp_path, tokenizer):
    path = write(tmp_path / "d.jsonl", DOCS, "jsonl")
    with pytest.raises(CalibrationTextError, match=r"chat_template=true, but the tokenizer 'char-tokenizer' has no chat template"):
        calibration_samples(spec_of(custom(path), nsamples=2, seqlen=16, chat_template=True), tokenizer)
