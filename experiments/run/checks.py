"""Checks beyond the typed groups of schema.py, all before the model loads: the top-level keys
(unknown keys, types, names that become paths), what a method cannot mean (fp16 at 3 bits), the
device, the shapes of random models, window lengths, and an evaluation that measures something.

Each failure is a ConfigError that names the key and the fix; `quantlab.experiments.run.cli` prints it and
exits 2. `check_top_level` runs inside `schema.validate` (the typed groups need ints there);
`check_run` runs on the validated `RunConfig`.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterable
from typing import Any

from omegaconf import OmegaConf

from quantlab.experiments.run.cli import CONF_DIR
from quantlab.experiments.run.objective import check_objectives
from quantlab.methods.base import ConfigError

# keys a run may carry besides those of conf/config.yaml: `+force=true` redoes finished runs of
# a sweep, `+skip_invalid=true` runs a sweep's valid jobs and records the invalid ones as failed
FLAGS = ("force", "skip_invalid")
INT_KEYS = ("bits", "group_size", "seed")
# keys quantlab itself adds to a run's recorded config (so a recorded config validates again)
RECORDED = ("data_fingerprints",)


@functools.lru_cache(maxsize=1)
def known_top_level_keys() -> frozenset[str]:
    """The groups of config.yaml's defaults list, its own keys and the flags."""
    primary = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))
    assert isinstance(primary, dict)
    groups = set()
    for entry in primary.get("defaults", []):
        if isinstance(entry, dict):
            groups.update(str(k).split("@")[0].removeprefix("optional ").strip() for k in entry)
    keys = {k for k in primary if k not in ("defaults", "hydra")}
    return frozenset((groups | keys | set(FLAGS) | set(RECORDED) | {"hydra"}) - {"experiment", "hparams_search", "local", "_self_"})


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate nearest to a mistyped word, or None when none is near: difflib's similarity
    (at least 0.6), less a little per letter of length difference, so `modle` finds `model`
    rather than `modules`."""
    word = str(word)

    def score(candidate: str) -> float:
        return difflib.SequenceMatcher(None, word, candidate).ratio() - 0.05 * abs(len(candidate) - len(word))

    near = difflib.get_close_matches(word, [str(c) for c in candidates], n=5, cutoff=0.6)
    return max(near, key=score) if near else None


def unknown_key_message(key: str, valid: Iterable[str], owner: str) -> str:
    """`key` (dotted, as typed on the command line) is no key of its parent, a section of the
    group `owner` (e.g. `method=gptq`): the message names the closest valid key and all of them."""
    valid = sorted(set(valid))
    parent, _, leaf = key.rpartition(".")
    where = parent if "." in parent else owner  # a nested section (eval.ppl) by its path
    match = closest(leaf, valid)
    hint = f"; did you mean {parent + '.' if parent else ''}{match}?" if match else "."
    return f"{key} is not a key of {where}{hint} Valid keys of {where}: {', '.join(valid)}"


def _path_component(value: Any, key: str) -> None:
    """name and sweep_name become directory names: one plain component, inside the output folder."""
    text = str(value)
    if not text.strip() or text in (".", "..") or any(c in text for c in "/\\\0") or text.startswith("~"):
        raise ConfigError(
            f"{key}={text!r} cannot name a directory inside the output folder: use a plain name without "
            "'/', '\\\\', '~' or '..' (paths.output_dir moves the folder itself)"
        )


def top_level_key_message(unknown: list[str]) -> str:
    """Unknown top-level keys: the closest valid one for each, and all of them."""
    valid = sorted(known_top_level_keys() - {"hydra", *RECORDED})
    hints = [f"{key} -> {match}" for key in unknown if (match := closest(key, valid))]
    return (
        f"unknown top-level key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: a typo? "
        + (f"Did you mean: {', '.join(hints)}? " if hints else "")
        + f"Valid: {', '.join(valid)}. Group knobs go under their group (e.g. method.damp, eval.ppl.seqlen)"
    )


def check_top_level(resolved: dict[str, Any]) -> None:
    unknown = sorted(set(resolved) - known_top_level_keys())
    if unknown:
        raise ConfigError(top_level_key_message(unknown))
    for key in INT_KEYS:
        value = resolved.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer (e.g. {key}=4)")
    for key in FLAGS:
        if key in resolved and not isinstance(resolved[key], bool):
            raise ConfigError(f"{key}={resolved[key]!r} must be true or false")
    tags = resolved.get("tags")
    if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, (str, int, float)) for t in tags)):
        raise ConfigError(f"tags={tags!r} must be a list of words: tags=[a,b]")
    compare = resolved.get("compare_with")
    if compare is not None:
        if not isinstance(compare, list) or not all(isinstance(n, str) for n in compare):
            raise ConfigError(
                f"compare_with={compare!r} must be a list of method names, e.g. compare_with=[rtn] "
                "(a bare name is read as a string)"
            )
        if len(set(compare)) != len(compare):
            raise ConfigError(f"compare_with={compare} names a method twice")
    for key in ("name", "sweep_name"):
        if key in resolved:
            _path_component(resolved[key], key)
    check_objectives(resolved)  # optimized_metric, bits_budget: what a sweeper optimizes


CALIB_SOURCES = ("builtin", "custom", "hf")
# the keys each calib.source reads besides the common ones (dataset, nsamples, seqlen, seed, sampling, ...)
CALIB_KEYS = {
    "builtin": (),
    "custom": ("path", "format", "field", "join"),
    "hf": ("field", "split", "config", "revision", "join"),
}
CALIB_USAGE = {
    "builtin": "calib=c4 (or wikitext2, ptb, pydocs, pile)",
    "custom": "calib=custom calib.path=FILE",
    "hf": "calib=hf calib.dataset=ID",
}


def check_calib(calib: Any) -> None:
    """The calib group (a typed CalibConfig): a built-in text, a file (calib=custom) or a hub
    dataset (calib=hf), with only the keys that source reads. Files are read by the preflight."""
    from quantlab.experiments.data.calibration import CALIBRATION_DATASETS, SAMPLINGS
    from quantlab.experiments.data.custom import CalibrationTextError

    if calib.sampling not in SAMPLINGS:
        raise ConfigError(f"calib.sampling={calib.sampling!r} is not valid; choose one of: {', '.join(SAMPLINGS)}")
    for knob in ("nsamples", "seqlen", "batch_size"):
        if getattr(calib, knob) < 1:
            raise ConfigError(f"calib.{knob}={getattr(calib, knob)} must be a positive integer")
    if calib.source not in CALIB_SOURCES:
        raise ConfigError(
            f"calib.source={calib.source!r} is not valid; choose one of: {', '.join(CALIB_SOURCES)} "
            "(or pick the group: calib=custom, calib=hf)"
        )
    for key in ("path", "format", "field", "split", "config", "revision", "join"):
        value = getattr(calib, key)
        if value == "":
            raise ConfigError(f"calib.{key} is empty: name it, or drop it for its default")
        if value is not None and key not in CALIB_KEYS[calib.source]:
            fix = " or ".join(
                CALIB_USAGE[s].replace(f"calib.{key}=FILE", "") + f" calib.{key}={value}"
                for s in CALIB_SOURCES if key in CALIB_KEYS[s]
            ).replace("  ", " ")
            what = "a built-in dataset" if calib.source == "builtin" else f"calib={calib.source}"
            raise ConfigError(
                f"calib.{key} is not read with {what} (calib.dataset={calib.dataset}): drop it, or use {fix}"
            )
    if calib.join is not None and calib.sampling == "awq":
        raise ConfigError(
            "calib.join applies to gptq sampling (windows of a joined text); awq sampling takes whole "
            "documents as lines: drop calib.join or use calib.sampling=gptq"
        )
    if calib.source == "builtin" and calib.dataset not in CALIBRATION_DATASETS:
        raise ConfigError(
            f"calib.dataset={calib.dataset!r} is not valid; choose one of: {', '.join(CALIBRATION_DATASETS)}; "
            "for any other text: calib=custom calib.path=FILE, or calib=hf calib.dataset=HUB_ID"
        )
    if calib.source == "custom":
        if calib.dataset != "custom":
            raise ConfigError(
                f"calib=custom reads calib.path, so calib.dataset stays 'custom' (not {calib.dataset!r}); "
                f"for a hub dataset use calib=hf calib.dataset={calib.dataset}"
            )
        if not calib.path:
            raise ConfigError("calib=custom needs calib.path=FILE: a .txt, .jsonl/.json or .parquet file of text")
        try:
            calib.spec().source.file_format()  # a known calib.format, or a suffix that tells it
        except CalibrationTextError as error:
            raise ConfigError(str(error)) from None
    if calib.source == "hf" and (not calib.dataset or calib.dataset in ("hf", "custom")):
        raise ConfigError("calib=hf needs calib.dataset=ID, a hub dataset id (e.g. calib.dataset=allenai/c4)")


def override_keys(overrides: list[str] | None) -> dict[str, str]:
    """{key: value} of command-line overrides (`+`/`++` prefixes dropped)."""
    out = {}
    for item in overrides or []:
        key, _, value = item.partition("=")
        out[key.lstrip("+~")] = value
    return out


def check_overrides(run: Any, overrides: list[str] | None) -> None:
    """What a method cannot mean when asked for on the command line: fp16 quantizes nothing, and
    nf4 / fp4 / hqq keep their references' own bits or group size, so a top-level bit-width or group
    size given with them would only mislabel the run."""
    given = override_keys(overrides)
    block_type = getattr(type(run.method), "block_type", None)
    if block_type is not None and run.method_name.startswith("gguf_"):  # llama.cpp's types fix both
        for key, fixed in (("bits", run.method.bits), ("group_size", run.method.group_size)):
            if key in given and given[key] != str(fixed):
                raise ConfigError(
                    f"method={run.method_name} is llama.cpp's {block_type.name}: {fixed} for {key}, whatever "
                    f"{key}= says, so {key}={given[key]} would only mislabel the run; drop {key}="
                )
    if run.method_name != "fp16":
        # Methods with their own reference defaults (nf4/fp4: bnb's 4-bit blocks of 64; hqq: groups
        # of 64) do not read the top-level knob: one given on the command line would not reach them.
        for key in ("bits", "group_size"):
            own = getattr(run.method, key)
            if key in given and own != getattr(run, key):
                raise ConfigError(
                    f"method={run.method_name} takes {key} from method.{key} (here {own}, its reference default), "
                    f"so the top-level {key}={given[key]} would not reach it and would only mislabel the run: "
                    f"use method.{key}={given[key]} (in a sweep with other methods, sweep method.{key} per method "
                    "or run it as its own job)"
                )
        return
    for key, neutral in (("bits", "16"), ("group_size", "-1")):
        if key in given and given[key] != neutral:
            raise ConfigError(
                f"method=fp16 quantizes nothing, so {key}={given[key]} has no meaning and would only mislabel "
                f"the run: drop {key}= (in a sweep, run fp16 as its own job: -m method=fp16,rtn needs "
                "+skip_invalid=true, or sweep bits without fp16)"
            )


def _device(spec: Any) -> None:
    import torch

    text = str(spec.device)
    if text == "auto":
        return
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"model.device={text!r} is not valid; choose one of: auto, cpu, cuda, cuda:N, mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(
                f"model.device={text!r}, but {why} (torch {torch.__version__}); use model.device=cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"model.device={text!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"model.device={text!r}, but MPS is not available here; use model.device=cpu or auto")


def _random_model(spec: Any) -> None:
    """A random model's config must build a causal LM the adapters take (a table's or any
    transformers knows: experiments/models/adapters.py), with consistent shapes."""
    from transformers import AutoConfig
    from transformers.utils import logging as transf_logging

    from quantlab.experiments.models.adapters import (
        UnsupportedArchitecture,
        check_model_type,
        check_structure,
    )

    shape = dict(spec.random_config or {})
    model_type = shape.get("model_type")
    try:
        check_model_type(str(model_type))
    except UnsupportedArchitecture as error:
        raise ConfigError(f"model.random_config.model_type: {error}") from None
    for key, value in shape.items():
        if (key.endswith("_size") or key.startswith("num_") or key in ("ffn_dim", "max_position_embeddings",
                                                                         "word_embed_proj_dim")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"model.random_config.{key}={value!r} must be a positive integer")
    hidden, heads = shape.get("hidden_size"), shape.get("num_attention_heads")
    if hidden and heads and hidden % heads:
        raise ConfigError(
            f"model.random_config: hidden_size={hidden} is not a multiple of num_attention_heads={heads}"
        )
    kv_heads = shape.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise ConfigError(
            f"model.random_config: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    verbosity = transf_logging.get_verbosity()
    transf_logging.set_verbosity_error()  # a dry build: the load repeats its warnings (token ids, ...)
    try:
        config = AutoConfig.for_model(**shape)
        check_structure(config)  # a family without a table: its layout, on the meta device
    except UnsupportedArchitecture as error:
        raise ConfigError(f"model.random_config.model_type: {error}") from None
    except (ValueError, TypeError, KeyError) as error:
        raise ConfigError(f"model.random_config does not make a {model_type} config: {error}") from None
    finally:
        transf_logging.set_verbosity(verbosity)


def max_positions(spec: Any) -> int | None:
    """The positions a model was built for, where known before loading (random models)."""
    if spec.source == "random":
        value = (spec.random_config or {}).get("max_position_embeddings")
        return int(value) if value else None
    return None


def _methods(run: Any) -> list[Any]:
    """The run's method and its comparisons, as instances (a method may decide per config, e.g.
    onnx_int8 calibrates only in static mode)."""
    from quantlab.methods import get_method_class

    entries = [(run.method_name, run.method), *run.comparisons]
    return [get_method_class(name)(config) for name, config in entries]


def needs_calibration(run: Any) -> bool:
    """Whether the run reads calibration data: a method needs it, or static activation ranges do."""
    return run.act.static or any(method.needs_calibration for method in _methods(run))


def _activations(run: Any) -> None:
    """What activation quantization cannot combine with (schema.py checked the act group itself)."""
    if not run.act.quantizer().enabled:
        return
    runtimes = [method.name for method in _methods(run) if method.runtime is not None]
    if runtimes:
        raise ConfigError(
            f"method={runtimes[0]} quantizes its activations inside its own runtime (its method.mode), so act="
            f"{run.act.bits}-bit fake-quant cannot apply to it: use act=none"
        )
    trained = [method.name for method in _methods(run) if method.fine_tunes]
    if run.act.static and trained:
        raise ConfigError(
            f"act.mode=static calibrates its ranges during the block pass, before method={trained[0]} trains the "
            "weights, so they would describe the untrained model: use act.mode=dynamic (act=int8_per_token)"
        )
    if run.act.static and run.model.source == "quantized":
        raise ConfigError(
            "act.mode=static calibrates its ranges while the run quantizes; a saved model (model.source=quantized) "
            "holds weights only: use act.mode=dynamic (act=int8_per_token), or quantize in this run"
        )


def _kv(run: Any) -> None:
    """What KV-cache quantization needs (schema.py checked the kv group itself): a perplexity
    evaluation in torch whose windows are longer than one chunk, a transformers with layered
    caches, and, where the shape is known before loading (random models), a model it can serve;
    other models are checked right after they load (experiments/run/flow.py)."""
    if not run.kv.enabled:
        return
    bits = f"kv.bits={run.kv.bits}"
    runtimes = [method.name for method in _methods(run) if method.runtime is not None]
    if runtimes:
        raise ConfigError(f"method={runtimes[0]} evaluates an ONNX graph in its own runtime, which has no quantized KV "
                          f"cache, so {bits} cannot apply to it: use kv=none")
    if run.eval.tasks:
        raise ConfigError(f"{bits} is evaluated by perplexity through the quantized cache; the zero-shot tasks run in "
                          "lm-eval without it: use eval.tasks=[] with kv, or kv=none for the tasks")
    ppl = run.eval.ppl
    if not ppl.datasets:
        raise ConfigError(f"{bits} is evaluated by perplexity: name eval.ppl.datasets (e.g. [wikitext2])")
    if run.kv.chunk >= ppl.seqlen:
        raise ConfigError(f"kv.chunk={run.kv.chunk} is not shorter than eval.ppl.seqlen={ppl.seqlen}: one chunk takes "
                          "the whole window, so no token would read the quantized cache; lower kv.chunk (e.g. 128)")
    if run.kv.granularity == "per_channel" and run.kv.residual >= ppl.seqlen:
        raise ConfigError(f"kv.residual={run.kv.residual} is not shorter than eval.ppl.seqlen={ppl.seqlen}: every token "
                          "would stay in the full-precision residual; lower kv.residual")
    try:
        from quantlab.experiments.models.kv_cache import check_kv_model
    except ImportError as error:
        import transformers

        raise ConfigError(f"{bits} needs transformers' layered cache API (transformers >= 4.56; installed "
                          f"{transformers.__version__}: {error}): upgrade transformers or use kv=none") from None
    if run.model.source == "random":
        from transformers import AutoConfig

        config = AutoConfig.for_model(**dict(run.model.random_config or {}))
        try:
            check_kv_model(config, run.kv.quantizer(), run.model.name)
        except ValueError as error:
            raise ConfigError(str(error)) from None


def _runtime_methods(run: Any) -> None:
    """A method another runtime carries out (onnx_int8: ONNX Runtime) evaluates perplexity in that
    runtime only: what needs the torch model, or its weight formats, cannot run with it."""
    runtimes = [method for method in _methods(run) if method.runtime is not None]
    if not runtimes:
        return
    name = runtimes[0].name
    from quantlab.experiments.evaluation.onnx_runtime import missing_packages

    if missing := missing_packages():
        raise ConfigError(
            f"method={name} needs {', '.join(missing)} (ONNX Runtime and torch's ONNX exporter): "
            "pip install -e '.[baselines]'"
        )
    refused = [
        (bool(run.eval.tasks), "eval.tasks", "eval.tasks=[]"),
        (run.eval.kl.enabled, "eval.kl.enabled", "eval.kl.enabled=false"),
        (run.eval.backend != "fake", f"eval.backend={run.eval.backend}", "eval.backend=fake"),
        (run.save_model, "save_model=true", "save_model=false"),
        (run.model.source == "quantized", "model.source=quantized", "a full-precision model"),
    ]
    for bad, what, fix in refused:
        if bad:
            raise ConfigError(
                f"method={name} quantizes and evaluates an ONNX graph in ONNX Runtime (perplexity only), so "
                f"{what} cannot apply to it (it needs the torch model or its weight formats): use {fix}"
            )


def check_run(run: Any, overrides: list[str] | None = None) -> None:
    """Everything schema.validate leaves to a RunConfig, still before anything loads."""
    from quantlab.experiments.export.plan import check_export

    check_overrides(run, overrides)
    check_export(run)
    _device(run.model)
    _runtime_methods(run)
    _activations(run)
    if run.model.source == "random":
        _random_model(run.model)
    _kv(run)
    ppl = run.eval.ppl
    if not ppl.datasets and not run.eval.tasks:
        raise ConfigError(
            "eval.ppl.datasets=[] and no eval.tasks: the run would measure nothing; name a dataset "
            "(eval.ppl.datasets=[wikitext2]) or a task (eval.tasks=[piqa])"
        )
    if len(set(ppl.datasets)) != len(ppl.datasets):
        raise ConfigError(f"eval.ppl.datasets={ppl.datasets} names a dataset twice")
    if ppl.datasets and ppl.seqlen < 2:
        raise ConfigError(
            f"eval.ppl.seqlen={ppl.seqlen}: a window of one token predicts no token (perplexity undefined); "
            "use at least 2 (the papers use 2048)"
        )
    limit = max_positions(run.model)
    if limit is not None:
        if ppl.datasets and ppl.seqlen > limit:
            raise ConfigError(
                f"eval.ppl.seqlen={ppl.seqlen} exceeds the {limit} positions model {run.model.name!r} is built for "
                "(max_position_embeddings): lower eval.ppl.seqlen"
            )
        if needs_calibration(run) and run.calib.seqlen > limit:
            raise ConfigError(
                f"calib.seqlen={run.calib.seqlen} exceeds the {limit} positions model {run.model.name!r} is built "
                "for (max_position_embeddings): lower calib.seqlen"
            )
