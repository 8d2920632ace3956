"""The malformed-config table: every bad input stops before the model loads, with a non-zero exit,
no traceback and a message that names the bad key or file.

Each case runs the real CLI entry point (`quantlab.experiments.run.cli.app`, Hydra included) in this process,
with `load_model` replaced by a tripwire, so the table of 80-odd cases costs seconds, not a
Python start and a model load each. A case passes when the exit status is non-zero, neither
stream holds a traceback, stderr names the key or file (`needle`), the tripwire never fired and
the run's record, where one was written, is failed with no model loaded.
"""

from __future__ import annotations

import bz2
import gzip
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import quantlab.experiments.models.loading as loading
import quantlab.experiments.run.cli as cli
import quantlab.experiments.run.flow as run_module

BASE = [
    "model=tiny-llama", "method=rtn", "calib=pydocs", "calib.nsamples=2",
    "calib.seqlen=32", "eval.ppl.datasets=[pydocs]", "eval.ppl.seqlen=32", "eval.ppl.max_windows=2",
]


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    needle: str  # what stderr must name: the bad key, value or file
    data: str | None = None  # a damaged data folder (see `bad_data`), as paths.data_dir
    multirun: bool = False


def case(id: str, args: str, needle: str, data: str | None = None, multirun: bool = False) -> Case:
    return Case(id, tuple(args.split()), needle, data, multirun)


CASES = [
    # config groups and their options
    case("unknown-model", "model=nope", "model/nope"),
    case("unknown-method", "method=nope", "method/nope"),
    case("unknown-calib", "calib=nope", "calib/nope"),
    case("unknown-eval", "eval=nope", "eval/nope"),
    case("unknown-logger", "logger=nope", "logger/nope"),
    case("unknown-experiment", "experiment=nope", "experiment/nope"),
    # model
    case("model-source", "model.source=ftp", "model.source"),
    case("model-dtype", "model.dtype=float8", "model.dtype"),
    case("model-unknown-key", "+model.colour=red", "colour"),
    case("model-device-tpu", "model.device=tpu", "model.device"),
    case("model-device-mps", "model.device=mps", "model.device"),
    case("model-tokenizer", "model.tokenizer=nope", "'nope'"),
    case("random-heads", "model.random_config.num_attention_heads=3", "num_attention_heads"),
    case("random-kv-heads", "model.random_config.num_key_value_heads=3", "num_key_value_heads"),
    case("random-model-type", "model.random_config.model_type=gpt9", "model_type"),
    case("random-unsupported-type", "model.random_config.model_type=gpt2", "model_type"),
    case("random-vocab", "model.random_config.vocab_size=0", "vocab_size"),
    case("random-hidden-negative", "model.random_config.hidden_size=-1", "hidden_size"),
    case("random-hidden-text", "model.random_config.hidden_size=abc", "hidden_size"),
    case("random-opt-ffn", "model=tiny-opt model.random_config.ffn_dim=0", "ffn_dim"),
    case("eval-seqlen-over-positions", "eval.ppl.seqlen=4096", "eval.ppl.seqlen"),
    case("opt-eval-seqlen-over-positions", "model=tiny-opt eval.ppl.seqlen=4096", "eval.ppl.seqlen"),
    case("calib-seqlen-over-positions", "method=gptq calib.seqlen=4096", "calib.seqlen"),
    # method, bits, group size
    case("bits-1", "bits=1", "bits=1"),
    case("bits-9", "bits=9", "bits=9"),
    case("bits-word", "bits=four", "bits"),
    case("bits-float", "bits=4.5", "bits"),
    case("awq-bits-9", "method=awq bits=9", "bits=9"),
    case("fp16-bits", "method=fp16 bits=3", "bits=3"),
    case("fp16-group-size", "method=fp16 group_size=64", "group_size=64"),
    case("gguf-bits", "method=gguf_q4_0 bits=3", "bits=3"),
    case("gguf-group-size", "method=gguf_q4_1 group_size=128", "group_size=128"),
    case("gguf-method-group-size", "method=gguf_q8_0 method.group_size=64", "group_size=64"),
    case("fp16-bits-word", "method=fp16 bits=four", "bits"),
    case("fp16-seed-word", "method=fp16 seed=abc", "seed"),
    case("group-size-0", "group_size=0", "group_size=0"),
    case("group-size-negative", "group_size=-2", "group_size=-2"),
    case("group-size-word", "group_size=abc", "group_size"),
    case("rtn-unknown-knob", "+method.damp=0.1", "damp"),
    case("rtn-sym-not-bool", "method.sym=maybe", "method.sym"),
    case("gptq-damp", "method=gptq method.damp=-1", "damp"),
    case("gptq-block-size", "method=gptq method.block_size=0", "block_size"),
    case("gptq-reference-numerics-not-bool", "method=gptq method.reference_numerics=maybe", "reference_numerics"),
    case("owq-target-bits", "method=owq method.target_bits=5 bits=3", "target_bits"),
    case("owq-outliers", "method=owq method.n_outliers=-1 group_size=-1", "n_outliers"),
    case("owq-tuning", "method=owq method.tuning=foo", "tuning"),
    case("awq-grid", "method=awq method.n_grid=0", "n_grid"),
    # baselines: bitsandbytes' 4-bit types and HQQ keep their references' own bits / group size
    case("nf4-top-level-bits", "method=nf4 bits=3", "method.bits"),
    case("nf4-top-level-group-size", "method=nf4 group_size=128", "method.group_size"),
    case("nf4-blocksize", "method=nf4 method.group_size=100", "group_size=100"),
    case("nf4-double-quant-not-bool", "method=nf4 method.double_quant=maybe", "method.double_quant"),
    case("fp4-bits", "method=fp4 method.bits=3", "bits=3"),
    case("hqq-bits", "method=hqq bits=5", "bits=5"),
    case("hqq-top-level-group-size", "method=hqq group_size=128", "method.group_size"),
    case("hqq-group-size", "method=hqq method.group_size=60", "multiple of 8"),
    case("hqq-iters", "method=hqq method.iters=0", "iters"),
    case("hqq-lp-norm", "method=hqq method.lp_norm=2", "lp_norm"),
    # ONNX Runtime INT8: quantized and evaluated as an ONNX graph, perplexity only
    case("onnx-mode", "method=onnx_int8 method.mode=fast", "mode='fast'"),
    case("onnx-top-level-bits", "method=onnx_int8 bits=4", "method.bits"),
    case("onnx-groups", "method=onnx_int8 method.group_size=128", "no groups"),
    case("onnx-dynamic-calibrates-nothing", "method=onnx_int8 method.calibrate_method=entropy", "mode=static"),
    case("onnx-tasks", "method=onnx_int8 eval.tasks=[piqa]", "eval.tasks"),
    case("onnx-kl", "method=onnx_int8 eval.kl.enabled=true", "eval.kl.enabled"),
    case("onnx-packed", "method=onnx_int8 eval.backend=packed", "eval.backend=packed"),
    case("onnx-save-model", "method=onnx_int8 save_model=true", "save_model"),
    case("onnx-compared-with-kl", "compare_with=[onnx_int8] eval.kl.enabled=true", "eval.kl.enabled"),
    # top level
    case("seed-word", "seed=abc", "seed"),
    case("seed-float", "seed=1.5", "seed"),
    case("unknown-top-level", "+forse=true", "forse"),
    case("force-not-bool", "+force=maybe", "force"),
    case("tags-string", "tags=abc", "tags"),
    case("tags-nested", "tags=[[a]]", "tags"),
    case("compare-with-string", "compare_with=rtn", "compare_with"),
    case("compare-with-unknown", "compare_with=[nope]", "'nope'"),
    case("compare-with-twice", "compare_with=[rtn,rtn]", "compare_with"),
    case("name-escapes", "name=../../x", "name="),
    case("name-dotdot", "name=..", "name="),
    case("sweep-name-escapes", "sweep_name=../../x", "sweep_name"),
    case("expected-no-source", "+expected.ppl.pydocs=5", "expected.source"),
    case("expected-not-evaluated", "+expected.source=x +expected.ppl.wikitext2=5", "expected.ppl"),
    case("expected-not-a-number", "+expected.source=x +expected.ppl.pydocs=abc", "expected.ppl.pydocs"),
    # calibration
    # activation quantization and observers (experiments/run/schema.py ActConfig, ObserverConfig)
    case("act-bits", "act.bits=9", "act.bits"),
    case("act-granularity", "act=int8_per_token act.granularity=per_row", "act.granularity"),
    case("act-static-per-token", "act=int8_per_token act.mode=static", "act.granularity=per_tensor"),
    case("act-unknown-key", "+act.clip=true", "clip"),
    case("observer-without-static", "observer=percentile", "act=int8_static"),
    case("observer-with-dynamic", "act=int8_per_token observer=mse", "act.mode=dynamic"),
    case("observer-foreign-option", "act=int8_static +observer.momentum=0.1", "observer.momentum"),
    case("observer-bad-option", "act=int8_static observer=percentile observer.percentile=20", "observer.percentile"),
    case("observer-entropy-asym", "act=int8_static act.sym=false observer=entropy", "act.sym=true"),
    case("act-with-onnx", "act=int8_per_token method=onnx_int8", "act=none"),
    # KV-cache quantization (experiments/run/schema.py KVConfig, checks.py _kv)
    case("kv-bits", "kv=int4 kv.bits=1", "kv.bits"),
    case("kv-granularity", "kv=int4 kv.granularity=per_head", "kv.granularity"),
    case("kv-unknown-key", "+kv.clip=true", "clip"),
    case("kv-chunk-zero", "kv=int8 kv.chunk=0", "kv.chunk"),
    case("kv-chunk-whole-window", "kv=int8 kv.chunk=32", "kv.chunk=32"),
    case("kv-channel-no-residual", "kv=int4 kv.granularity=per_channel", "kv.residual"),
    case("kv-residual-whole-window", "kv=kivi2 kv.group_size=8 kv.residual=32 kv.chunk=8", "kv.residual=32"),
    case("kv-group-not-head-dim", "kv=int4 kv.group_size=6 kv.chunk=8", "head_dim=16"),
    case("kv-kivi-group-not-head-dim", "kv=kivi2 eval.ppl.seqlen=256", "head_dim=16"),
    case("kv-sliding-window", "kv=int4 kv.chunk=8 model.random_config.model_type=mistral +model.random_config.sliding_window=16",
         "sliding_attention"),
    case("kv-with-tasks", "kv=int8 eval.tasks=[piqa]", "eval.tasks"),
    case("kv-with-onnx", "kv=int8 method=onnx_int8", "kv=none"),
    case("calib-dataset", "calib.dataset=imagenet", "calib.dataset"),
    case("calib-nsamples", "calib.nsamples=0", "calib.nsamples"),
    case("calib-nsamples-word", "calib.nsamples=abc", "calib.nsamples"),
    case("calib-seqlen", "calib.seqlen=0", "calib.seqlen"),
    case("calib-seqlen-word", "calib.seqlen=abc", "calib.seqlen"),
    case("calib-sampling", "calib.sampling=foo", "calib.sampling"),
    case("calib-batch-size", "calib.batch_size=0", "calib.batch_size"),
    case("calib-unknown-key", "+calib.foo=1", "calib.foo"),
    case("calib-seed-word", "calib.seed=abc", "calib.seed"),
    case("calib-path-with-builtin", "method=gptq +calib.path=/tmp/calib.txt", "calib.path"),
    case("calib-custom-no-path", "method=gptq calib=custom", "calib.path"),
    case("calib-custom-missing-file", "method=gptq calib=custom calib.path=/nonexistent/calib.jsonl", "calib.path"),
    case("calib-custom-unknown-suffix", "method=gptq calib=custom calib.path=/tmp/calib.docx", "calib.format"),
    case("calib-hf-no-id", "method=gptq calib=hf", "calib.dataset"),
    # evaluation
    case("eval-dataset", "eval.ppl.datasets=[wikitext3]", "wikitext3"),
    case("eval-no-dataset", "eval.ppl.datasets=[]", "eval.ppl.datasets"),
    case("eval-dataset-twice", "eval.ppl.datasets=[pydocs,pydocs]", "eval.ppl.datasets"),
    case("eval-datasets-string", "eval.ppl.datasets=wikitext2", "eval.ppl.datasets"),
    case("eval-seqlen-0", "eval.ppl.seqlen=0", "eval.ppl.seqlen"),
    case("eval-seqlen-1", "eval.ppl.seqlen=1", "eval.ppl.seqlen"),
    case("eval-max-windows", "eval.ppl.max_windows=0", "eval.ppl.max_windows"),
    case("eval-batch-size", "eval.ppl.batch_size=0", "eval.ppl.batch_size"),
    case("eval-unknown-key", "+eval.foo=1", "eval.foo"),
    case("task-unknown", "eval.tasks=[nope]", "'nope'"),
    case("task-twice", "eval.tasks=[piqa,piqa]", "eval.tasks"),
    case("task-source", "eval.task_source=ftp", "eval.task_source"),
    case("task-fewshot", "eval.num_fewshot=-1", "eval.num_fewshot"),
    case("task-limit", "eval.limit=0", "eval.limit"),
    case("task-limit-word", "eval.limit=abc", "eval.limit"),
    case("kl-top-k", "eval.kl.top_k=0", "eval.kl.top_k"),
    case("kl-tail", "eval.kl.tail_samples=-1", "eval.kl.tail_samples"),
    case("kl-dataset", "eval.kl.datasets=[c4]", "eval.kl.datasets"),
    case("kl-max-windows", "eval.kl.max_windows=0", "eval.kl.max_windows"),
    case("kl-enabled-not-bool", "eval.kl.enabled=maybe", "eval.kl.enabled"),
    case("eval-backend", "eval.backend=int4", "eval.backend"),
    case("eval-kernel", "eval.kernel=marlin", "eval.kernel"),
    case("save-model-not-bool", "save_model=maybe", "save_model"),
    case("quantized-no-path", "model=quantized", "model.path"),
    case("quantized-not-a-folder", "model=quantized model.path=/nonexistent/dir", "model.path"),
    # export (experiments/export/plan.py): the format, its options, what the method's weights allow
    case("export-unknown", "export=onnx", "export/onnx"),
    case("export-format", "export.format=onnx", "export.format"),
    case("export-checkpoint-format", "export=gptq export.checkpoint_format=v3", "export.checkpoint_format"),
    case("export-unknown-key", "+export.foo=1", "export.foo"),
    case("export-path-without-format", "export.path=/tmp/x", "export.path"),
    case("export-path-is-a-file", "export=gptq export.path=/etc/hostname", "export.path"),
    case("export-path-not-an-export", "export=gptq export.path=/etc", "export.path"),
    case("export-fp16", "method=fp16 export=gptq", "export=gptq"),
    case("export-vptq", "method=vptq export=compressed-tensors", "export=compressed-tensors"),
    case("export-owq", "method=owq group_size=-1 export=gguf", "export=gguf"),
    case("export-slim", "method=slim_llm bits=2 export=gptq", "export=gptq"),
    case("export-gguf-act-order", "method=gptq method.act_order=true export=gguf", "export=gguf"),
    case("export-gguf-group-16", "group_size=16 export=gguf", "export=gguf"),
    case("export-gguf-3-bits", "bits=3 export=gguf", "export=gguf"),
    case("export-gguf-opt", "model=tiny-opt export=gguf", "export=gguf"),
    case("export-ct-float-zero", "method.float_zero=true export=compressed-tensors", "export=compressed-tensors"),
    case("export-ct-3-bits", "bits=3 export=compressed-tensors", "export=compressed-tensors"),
    case("export-awq-8-bits", "bits=8 export=awq", "export=awq"),
    case("export-gptq-q4_1", "method=gguf_q4_1 export=gptq", "export=gptq"),
    case("export-nf4", "method=nf4 export=gptq", "NF4 / FP4"),
    case("export-onnx-int8", "method=onnx_int8 export=gguf", "ONNX Runtime"),
    case("export-hqq-float-zero", "method=hqq export=compressed-tensors", "float zero-point"),
    # logger and paths
    case("logger-mode-none", "logger.mode=foo", "logger.mode"),
    case("logger-mode-wandb", "logger=wandb logger.mode=foo", "logger.mode"),
    case("logger-unknown-key", "logger=wandb +logger.foo=1", "logger.foo"),
    case("paths-unknown-key", "+paths.foo=1", "paths.foo"),
    case("paths-block-inputs", "paths.cache_block_inputs=maybe", "paths.cache_block_inputs"),
    # data files, read before the model loads (damaged copies made by `bad_data`)
    case("data-dir-missing", "eval.ppl.datasets=[wikitext2]", "wiki.test.raw", data="nowhere"),
    case("wikitext-empty", "eval.ppl.datasets=[wikitext2]", "wiki.test.raw", data="wikitext-empty"),
    case("wikitext-blank", "eval.ppl.datasets=[wikitext2]", "wiki.test.raw", data="wikitext-blank"),
    case("wikitext-not-utf8", "eval.ppl.datasets=[wikitext2]", "wiki.test.raw", data="wikitext-latin1"),
    case("wikitext-too-short", "eval.ppl.datasets=[wikitext2] eval.ppl.seqlen=512", "wiki.test.raw",
         data="wikitext-short"),
    case("wikitext-calib-missing", "method=gptq calib=wikitext2", "wiki.train.raw", data="wikitext-short"),
    case("ptb-valid-empty", "eval.ppl.datasets=[ptb]", "ptb.valid.txt", data="ptb-damaged"),
    case("ptb-test-not-utf8", "eval.ppl.datasets=[ptb-new]", "ptb.test.txt", data="ptb-damaged"),
    case("ptb-train-truncated-gz", "method=gptq calib=ptb", "ptb.train.txt.gz", data="ptb-damaged"),
    case("ptb-train-not-gzip", "method=gptq calib=ptb", "ptb.train.txt.gz", data="ptb-not-gzip"),
    case("c4-truncated-gz", "eval.ppl.datasets=[c4]", "c4_en_validation_sample_2k.json.gz", data="c4-truncated"),
    case("c4-not-json", "method=gptq calib=c4", "c4_en_validation_sample_2k.json.gz", data="c4-not-json"),
    case("c4-no-text-field", "eval.ppl.datasets=[c4-new]", "c4_en_validation_sample_2k.json.gz",
         data="c4-no-text"),
    case("c4-docs-too-short", "method=gptq calib=c4", "c4_en_validation_sample_2k.json.gz", data="c4-short"),
    case("onnx-static-calib-damaged", "method=onnx_int8 method.mode=static calib=c4", "c4_en_validation_sample_2k.json.gz",
         data="c4-not-json"),
    case("c4-empty", "eval.ppl.datasets=[c4]", "c4_en_validation_sample_2k.json.gz", data="c4-empty"),
    case("pile-offline", "method=gptq calib=pile", "pile"),
    case("piqa-labels-missing", "eval.tasks=[piqa]", "valid-labels.lst", data="piqa-no-labels"),
    case("piqa-not-json", "eval.tasks=[piqa]", "valid.jsonl", data="piqa-not-json"),
    case("piqa-truncated", "eval.tasks=[piqa]", "valid.jsonl", data="piqa-truncated"),
    case("arc-not-utf8", "eval.tasks=[arc_easy]", "ARC-Easy-Test.jsonl", data="arc-latin1"),
    case("hellaswag-truncated-bz2", "eval.tasks=[hellaswag_local]", "hellaswag_val_full.txt.bz2",
         data="hellaswag-truncated"),
    case("boolq-empty", "eval.tasks=[boolq]", "superglue_boolq_val.jsonl", data="boolq-empty"),
    # sweeps: every job is checked before the first starts; nothing runs
    case("sweep-bits", "bits=9,4", "bits=9", multirun=True),
    case("sweep-fp16-bits", "method=fp16,rtn bits=3", "method=fp16", multirun=True),
    case("sweep-seqlen", "eval.ppl.seqlen=1,32", "eval.ppl.seqlen=1", multirun=True),
    case("sweep-unknown-method", "method=nope,rtn", "nope", multirun=True),
    case("sweep-of-escaping-sweep-name", "sweep_name=../../x bits=3,4", "sweep_name", multirun=True),
]
if not __import__("torch").cuda.is_available():
    CASES += [
        case("model-device-cuda", "model.device=cuda", "model.device"),
        case("model-device-cuda-index", "model.device=cuda:1", "model.device"),
    ]


def _gz(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data))


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory, data_dir) -> Path:
    """One small damaged data folder per fault (only the files its cases read)."""
    root = tmp_path_factory.mktemp("bad_data")
    _write(root / "wikitext-empty/wikitext2/wiki.test.raw", "")
    _write(root / "wikitext-blank/wikitext2/wiki.test.raw", " \n \n\n")
    _write(root / "wikitext-latin1/wikitext2/wiki.test.raw", " = Caf\xe9 = \n".encode("latin-1") * 100)
    _write(root / "wikitext-short/wikitext2/wiki.test.raw", " = Title = \n Short text . \n")
    ptb = root / "ptb-damaged/ptb"
    _write(ptb / "ptb.valid.txt", "")
    _write(ptb / "ptb.test.txt", b"\xff\xfe bad bytes \n" * 100)
    whole = gzip.compress(b" the text of ptb \n" * 5000)
    _write(ptb / "ptb.train.txt.gz", whole[: len(whole) // 2])
    _write(root / "ptb-not-gzip/ptb/ptb.train.txt.gz", " plain text , not gzip \n" * 100)
    c4 = "c4/c4_en_validation_sample_2k.json.gz"
    docs = "".join(json.dumps({"text": "word " * 400}) + "\n" for _ in range(20)).encode()
    _write(root / "c4-truncated" / c4, gzip.compress(docs)[:-20])  # no end-of-stream marker
    _gz(root / "c4-not-json" / c4, b"this is not json\n" * 20)
    _gz(root / "c4-no-text" / c4, b'{"content": "no text field"}\n' * 20)
    _gz(root / "c4-short" / c4, b'{"text": "too short"}\n' * 20)
    _gz(root / "c4-empty" / c4, b"")
    piqa = Path(data_dir) / "piqa"
    (root / "piqa-no-labels/piqa").mkdir(parents=True)
    shutil.copy(piqa / "valid.jsonl", root / "piqa-no-labels/piqa/valid.jsonl")
    _write(root / "piqa-not-json/piqa/valid.jsonl", "{not json\n" * 1838)
    shutil.copy(piqa / "valid-labels.lst", root / "piqa-not-json/piqa/valid-labels.lst")
    lines = (piqa / "valid.jsonl").read_text().splitlines(keepends=True)
    labels = (piqa / "valid-labels.lst").read_text().splitlines(keepends=True)
    _write(root / "piqa-truncated/piqa/valid.jsonl", "".join(lines[:100]))
    _write(root / "piqa-truncated/piqa/valid-labels.lst", "".join(labels[:100]))
    _write(root / "arc-latin1/arc/ARC-Easy-Test.jsonl", '{"id": "caf\xe9"}\n'.encode("latin-1") * 10)
    whole = bz2.compress(b"context\n0\na\nb\nc\nd\n" * 2000)
    _write(root / "hellaswag-truncated/hellaswag/hellaswag_val_full.txt.bz2", whole[: len(whole) // 2])
    _write(root / "boolq-empty/boolq/superglue_boolq_val.jsonl", "")
    return root


class ModelLoaded(BaseException):
    """The tripwire: a case got as far as loading the model."""


def _tripwire(*args, **kwargs):
    raise ModelLoaded("the model was loaded")


def invoke(args: list[str], capsys, monkeypatch) -> tuple[object, str]:
    """The CLI in this process: (exit status or the escaped exception, stdout + stderr)."""
    monkeypatch.setattr(sys, "argv", ["quantlab", *args])
    capsys.readouterr()
    try:
        cli.app()
        status: object = 0
    except SystemExit as error:
        status = error.code
    except BaseException as error:  # noqa: BLE001 - the case reports it
        status = error
    out = capsys.readouterr()
    return status, out.out + out.err, out.err


@pytest.fixture
def tripwire(monkeypatch):
    monkeypatch.setattr(run_module, "load_model", _tripwire)
    monkeypatch.setattr(loading, "load_model", _tripwire)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


def test_the_table_is_big_enough():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_malformed_config_stops_before_the_model_loads(bad, tmp_path, bad_data, tripwire, capsys, monkeypatch):
    args = [*BASE, *bad.args, f"paths.cache_dir={tmp_path / 'cache'}"]
    if bad.data is not None:
        args.append(f"paths.data_dir={bad_data / bad.data}")
    if bad.multirun:
        args = ["-m", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    else:
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    status, output, err = invoke(args, capsys, monkeypatch)
    assert not isinstance(status, ModelLoaded), f"the model was loaded:\n{output}"
    assert not isinstance(status, BaseException), f"{type(status).__name__}: {status}\n{output}"
    assert status not in (0, None), f"exit status {status}:\n{output}"
    assert "Traceback (most recent call last)" not in output, output
    assert bad.needle in err, f"stderr does not name {bad.needle!r}:\n{err}"
    for record in tmp_path.rglob("result.json"):
        data = json.loads(record.read_text())
        assert data["status"] == "failed", record
        assert data["model"]["fingerprint"] is None and "load_s" not in data["timings"], record
    if bad.multirun:
        assert not list(tmp_path.rglob("result.json")), "a job of an invalid sweep ran"


@pytest.mark.parametrize("args", [["name=../../../../x"], ["-m", "sweep_name=../../x", "bits=3,4"]], ids=["run", "sweep"])
def test_names_never_leave_the_output_folder(args, tmp_path, tripwire, capsys, monkeypatch):
    """name and sweep_name become directory names: `../../x` wrote outside the output folder."""
    out = tmp_path / "a" / "b" / "out"
    out.mkdir(parents=True)
    monkeypatch.setenv("QUANTLAB_OUTPUT_DIR", str(out))
    status, output, err = invoke([*args, *BASE, f"paths.cache_dir={tmp_path / 'cache'}"], capsys, monkeypatch)
    assert status == 2 and "cannot name a directory inside the output folder" in err, output
    outside = [p for p in tmp_path.rglob("*") if out not in (p, *p.parents) and p not in out.parents]
    assert outside == [], outside


@pytest.mark.parametrize("how", ["env", "override"])
def test_an_output_folder_that_cannot_be_made_is_a_message(how, tmp_path, tripwire, capsys, monkeypatch):
    """Hydra makes the run's directory before quantlab runs; its error there was a traceback."""
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    args = list(BASE)
    if how == "env":
        monkeypatch.setenv("QUANTLAB_OUTPUT_DIR", str(blocked / "out"))
    else:
        args.append(f"hydra.run.dir={blocked / 'run'}")
    monkeypatch.setattr(sys, "argv", ["quantlab", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    out = capsys.readouterr()
    assert exit_.value.code == 1 and "Traceback" not in out.out + out.err
    assert f"{blocked} is a file" in out.err


def test_a_text_with_too_few_tokens_is_a_message_after_tokenization(tmp_path, capsys, monkeypatch):
    """Enough bytes for the preflight's bound, too few tokens for one window: the exact check comes
    after tokenization (so after the load), and is a message too, not a traceback."""
    data = tmp_path / "data" / "wikitext2"
    data.mkdir(parents=True)
    (data / "wiki.test.raw").write_text("a" * 300)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    args = [*BASE, "eval.ppl.datasets=[wikitext2]", "eval.ppl.seqlen=128", f"paths.data_dir={tmp_path / 'data'}",
            f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"]
    from quantlab.experiments.store.cache import cache_root

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(cache_root() / "models")  # the converted tokenizer, shared
    status, output, err = invoke(args, capsys, monkeypatch)
    assert status == 1 and "Traceback" not in output, output
    assert "fewer than seqlen=128" in err and "wikitext2" in err


def test_fp16_is_named_for_what_it_is():
    """method=fp16 was named after the top-level bits (fp16-w4-g128) although nothing is quantized."""
    from tests.conftest import compose_config

    assert compose_config("method=fp16").name == "fp16-w16-g-1"
    assert compose_config("method=rtn", "bits=3", "group_size=64").name == "rtn-w3-g64"


def test_a_full_output_folder_is_a_message(tmp_path, tripwire, capsys, monkeypatch):
    import errno

    import quantlab.experiments.records.record

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(quantlab.experiments.records.record, "atomic_write_json", full)
    status, output, err = invoke([*BASE, f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"],
                                 capsys, monkeypatch)
    assert status == 1 and "Traceback" not in output, output
    assert f"cannot write {tmp_path / 'run' / 'result.json'}: No space left on device" in err
