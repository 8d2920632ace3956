"""Typed schemas for every config group, checked before anything heavy loads.

Hydra composes the YAML; `validate` then merges each group into its dataclass (unknown keys and
wrong types fail there, naming the group) and checks ranges, so a typo costs a second, not a
model load. Method groups are checked against the config dataclass each method registers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

import quantlab.methods
from quantlab.experiments.data.calibration import CalibrationSpec, join_separator
from quantlab.experiments.data.custom import TextSource
from quantlab.experiments.data.protocols import EVAL_DATASETS
from quantlab.experiments.models.loading import DTYPES, ModelSpec
from quantlab.experiments.run import allocation as allocation_
from quantlab.experiments.run.checks import check_calib, check_top_level, unknown_key_message
from quantlab.experiments.run.module_rules import ModuleRule, parse_rules
from quantlab.experiments.run.sensitivity import SensitivityConfig
from quantlab.experiments.run.sensitivity import check_config as check_sensitivity
from quantlab.kernels.activations import ActivationQuantizer
from quantlab.kernels.kv_cache import KVQuantizer
from quantlab.methods.base import ConfigError, MethodConfig
from quantlab.methods.observers import OBSERVERS, Observer, make_observer, observer_options

MODEL_SOURCES = ("hub", "local", "gguf", "package_gguf", "random", "quantized")
EVAL_BACKENDS = ("fake", "packed")  # experiments/models/quantized.py apply_formats
EVAL_KERNELS = ("auto", "reference", "int4_cpu", "int8_cpu", "int4_cuda")  # kernels/linear.py


@dataclass
class CalibConfig:
    dataset: str | None = "c4"  # a built-in text; "custom" with calib=custom; the hub id with calib=hf
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 8
    sampling: str = "gptq"  # gptq: random seqlen windows; awq: nsamples lines -> seqlen-token blocks
    # Any other text (conf/calib/custom.yaml, hf.yaml; experiments/data/custom.py):
    source: str = "builtin"  # builtin: calib.dataset names one; custom: calib.path; hf: calib.dataset is a hub id
    path: str | None = None  # custom: the file (relative to the current directory)
    format: str | None = None  # custom: text, lines, jsonl, parquet; null: from the suffix
    field: str | None = None  # custom jsonl/parquet, hf: the field holding each document
    split: str | None = None  # hf
    config: str | None = None  # hf: the dataset's configuration
    revision: str | None = None  # hf
    join: str | None = None  # custom/hf, gptq sampling: null per document; paragraph, newline, space or a string
    chat_template: bool = False  # each document through the tokenizer's chat template

    def spec(self) -> CalibrationSpec:
        text = None
        if self.source == "custom":
            path = str(Path(self.path or "").expanduser().absolute())
            text = TextSource("custom", path=path, format=self.format, field=self.field or "text")
        elif self.source == "hf":
            text = TextSource("hf", field=self.field or "text", dataset=self.dataset, config=self.config,
                              split=self.split or "train", revision=self.revision)
        return CalibrationSpec(str(self.dataset), self.nsamples, self.seqlen, self.seed, self.sampling, text,
                               join_separator(self.join), self.chat_template)


@dataclass
class PPLConfig:
    datasets: list[str] = field(default_factory=lambda: ["wikitext2"])
    seqlen: int = 2048
    max_windows: int | None = None
    batch_size: int = 1


@dataclass
class KLConfig:
    """KL to the full-precision model over the perplexity windows (experiments/evaluation/kl.py)."""

    enabled: bool = False
    top_k: int = 32  # baseline log-probs kept per position (exact part of the KL)
    tail_samples: int = 32  # tokens drawn from the baseline's tail per position (unbiased tail); 0: a lower bound
    datasets: list[str] | None = None  # null: every eval.ppl dataset
    max_windows: int | None = None  # a further cap on eval.ppl.max_windows (the summary's disk size)


@dataclass
class EvalConfig:
    ppl: PPLConfig = field(default_factory=PPLConfig)
    tasks: list[str] = field(default_factory=list)  # lm-eval task names (experiments/evaluation/zeroshot)
    task_source: str = "auto"  # auto: local files when they are there (or the hub is off), else the hub; or local / hub
    num_fewshot: int | None = 0  # null: each task's own default (lm-eval's, e.g. gsm8k's 5)
    apply_chat_template: bool = False  # prompts in the tokenizer's chat template (lm-eval's --apply_chat_template)
    fewshot_as_multiturn: bool | None = None  # few-shot examples as chat turns; null: as apply_chat_template
    system_instruction: str | None = None  # prepended to every prompt (lm-eval's --system_instruction)
    include_path: str | None = None  # a folder of your own lm-eval task YAMLs (lm-eval's --include_path)
    lm_eval_files: bool = True  # lm-eval's own results/samples files under <run>/lm_eval/ (its EvaluationTracker)
    limit: int | None = None  # first N items of each task (lm-eval's --limit): a reduced protocol
    batch_size: int = 1  # lm-eval's batch size for the tasks
    kl: KLConfig = field(default_factory=KLConfig)
    # fake: the dequantized weights in plain linears (the papers' protocol); packed: the stored
    # low-bit weights in QuantLinear modules, run by `kernel` (auto: the fast path where one exists)
    backend: str = "fake"
    kernel: str = "auto"


@dataclass
class ActConfig:
    """`act=<preset>`: fake-quant of every quantized linear's input in the evaluated model
    (kernels/activations.py; README "Weight + activation quantization"). bits 16: off."""

    bits: int = 16
    granularity: str = "per_token"  # per_token (dynamic only) or per_tensor
    sym: bool = True
    mode: str = "dynamic"  # dynamic: each tensor's own range at run time; static: ranges from calibration

    def quantizer(self) -> ActivationQuantizer:
        return ActivationQuantizer(self.bits, self.granularity, self.sym, self.mode)  # type: ignore[arg-type]

    @property
    def static(self) -> bool:
        return self.bits != 16 and self.mode == "static"


@dataclass
class ObserverConfig:
    """`observer=<name>`: the statistic that fixes static activation ranges (methods/observers.py).
    Options left null keep the observer's own default; an option another observer owns is refused."""

    name: str = "min_max"
    momentum: float | None = None  # moving_average
    percentile: float | None = None  # percentile
    tail_capacity: int | None = None  # percentile
    num_bins: int | None = None  # entropy, mse
    start_bin: int | None = None  # entropy
    num_candidates: int | None = None  # mse

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "name" and v is not None}

    def make(self, act: ActConfig) -> Observer:
        """One observer for one linear input, on the grid of `act`."""
        return make_observer(self.name, bits=act.bits, sym=act.sym, **self.options())


def _validate_act(act: ActConfig, observer: ObserverConfig) -> None:
    """act and observer together: the quantizer's own rules, then an observer only where one is used."""
    try:
        act.quantizer()
    except ValueError as error:
        raise ConfigError(f"config group 'act': {error} (presets: act=none, int8_per_token, int8_static, "
                          "int4_per_token)") from None
    _choice(observer.name, tuple(OBSERVERS), "observer")
    wrong = sorted(set(observer.options()) - set(observer_options(observer.name)))
    if wrong:
        raise ConfigError(f"observer={observer.name} takes no {', '.join(wrong)} (its options: "
                          f"{', '.join(observer_options(observer.name)) or 'none'}): drop observer.{wrong[0]}")
    if not act.static:
        if observer != ObserverConfig():  # the default observer goes unused quietly; a chosen one is refused
            why = "act is off (act.bits=16)" if act.bits == 16 else "act.mode=dynamic takes each range at run time"
            raise ConfigError(f"observer={observer.name} sets static activation ranges, but {why}: use "
                              "act=int8_static (act.mode=static act.granularity=per_tensor), or drop observer=")
        return
    try:
        observer.make(act)
    except ValueError as error:
        raise ConfigError(f"config group 'observer': {error}") from None


@dataclass
class KVConfig:
    """`kv=<preset>`: keys and values quantized when written to the KV cache, perplexity evaluated
    as a chunked prefill through that cache (kernels/kv_cache.py, experiments/models/kv_cache.py;
    every field explained in conf/kv/none.yaml). bits 16: off."""

    bits: int = 16
    granularity: str = "per_token"  # per_token; per_channel: KIVI's per-channel keys
    sym: bool = False
    group_size: int = -1  # channels per per-token range (-1: the whole head); per_channel keys: tokens per range
    residual: int = 0  # most recent tokens kept in full precision until a block of this many fills
    chunk: int = 128  # prefill chunk of the perplexity evaluation (kv on only)

    def quantizer(self) -> KVQuantizer:
        return KVQuantizer(self.bits, self.granularity, self.sym, self.group_size, self.residual)  # type: ignore[arg-type]

    @property
    def enabled(self) -> bool:
        return self.bits != 16


def _validate_kv(kv: KVConfig) -> None:
    try:
        kv.quantizer()
    except ValueError as error:
        raise ConfigError(f"config group 'kv': {error} (presets: kv=none, int8, int4, int2, kivi4, kivi2)") from None
    _positive(kv.chunk, "kv.chunk")


@dataclass
class LoggerConfig:
    name: str = "none"
    project: str = "quantlab"
    entity: str | None = None
    mode: str = "offline"
    group: str | None = None
    job_type: str = "quantize"
    tags: list[str] = field(default_factory=list)


@dataclass
class ExportConfig:
    """`export=<format>`: the run's quantized model written in another format once saved
    (experiments/export/; checked before the model loads by experiments/export/plan.py)."""

    format: str | None = None  # null: no export
    path: str | None = None  # null: <run>/export-<format>
    checkpoint_format: str = "gptq"  # gptq only: gptq (v1) or gptq_v2


@dataclass
class ExpectedConfig:
    """Published numbers a run reproduces (paper configs), so its record shows the distance."""

    source: str
    ppl: dict[str, float] = field(default_factory=dict)


@dataclass
class PathsConfig:
    output_dir: str = "outputs"
    data_dir: str = "data"
    cache_dir: str = "~/.cache/quantlab"
    # block 0's inputs are nsamples x seqlen x hidden values (Llama-2-7B at 128 x 2048: 2 GB in
    # fp16): false keeps them out of the cache for huge models
    cache_block_inputs: bool = True
    # quantized models keyed without eval settings (experiments/store/artifacts.py): eval-only changes reload
    cache_quantized: bool = True

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser()


@dataclass
class RunConfig:
    model: ModelSpec
    method_name: str
    method: MethodConfig
    calib: CalibConfig
    eval: EvalConfig
    logger: LoggerConfig
    paths: PathsConfig
    bits: int
    group_size: int
    seed: int
    name: str
    tags: list[str]
    tokenizer_model: ModelSpec | None = None  # for random models that borrow a tokenizer
    comparisons: list[tuple[str, MethodConfig]] = field(default_factory=list)  # compare_with, validated
    expected: ExpectedConfig | None = None
    save_model: bool = False  # a copy of the quantized model in <run>/quantized_model
    export: ExportConfig = field(default_factory=ExportConfig)
    # per-module rules (experiments/run/module_rules.py), parsed for the method and for each compare_with
    modules: list[ModuleRule] = field(default_factory=list)
    comparison_modules: dict[str, list[ModuleRule]] = field(default_factory=dict)
    act: ActConfig = field(default_factory=ActConfig)
    observer: ObserverConfig = field(default_factory=ObserverConfig)
    sensitivity: SensitivityConfig | None = None  # experiment=sensitivity (experiments/run/sensitivity.py)
    allocation: allocation_.AllocationPlan | None = None  # allocation.target_bits: the widths, as `modules`
    kv: KVConfig = field(default_factory=KVConfig)


# the typed schema of each config group but `method` (each method registers its own)
GROUP_SCHEMAS: dict[str, type] = {
    "model": ModelSpec, "calib": CalibConfig, "eval": EvalConfig, "logger": LoggerConfig, "paths": PathsConfig,
    "export": ExportConfig, "act": ActConfig, "observer": ObserverConfig, "expected": ExpectedConfig,
}


def group_schema(group: str, section: Any) -> type | None:
    """The dataclass a group's section is merged into; for `method`, the named method's config."""
    if group != "method":
        return GROUP_SCHEMAS.get(group)
    name = section.get("name") if isinstance(section, (dict, DictConfig)) else None
    try:
        return quantlab.methods.get_method_class(str(name)).config_class
    except Exception:  # noqa: BLE001 - an unknown method is reported by validate_method
        return None


def schema_keys(schema: type, path: str = "") -> list[str] | None:
    """The keys `schema` takes at the dotted `path` inside it (e.g. eval's `ppl`), or None where
    the schema has no fixed keys there."""
    node: Any = OmegaConf.structured(schema)
    for part in filter(None, path.split(".")):
        node = node.get(part) if isinstance(node, DictConfig) and part in node else None
    return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) and node.keys() else None


def _typed(schema: type, section: Any, group: str) -> Any:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), section)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        message = str(error.msg if hasattr(error, "msg") else error).splitlines()[0]
        key = getattr(error, "full_key", None)
        name = group.split("/")[0]
        if isinstance(error, ConfigKeyError) and key:  # a typo: name the valid keys and the closest one
            parent = str(key).rpartition(".")[0]
            valid = schema_keys(schema, parent)
            if valid is not None:
                owner = group.replace("/", "=") if name == "method" else name
                extra = ["name"] if name == "method" and not parent else []
                raise ConfigError(unknown_key_message(f"{name}.{key}", valid + extra, owner)) from None
        where = f" key {name}.{key}" if key else ""
        raise ConfigError(f"config group {group!r}{where}: {message}") from None


def _choice(value: str, valid: tuple[str, ...] | list[str], what: str) -> None:
    if value not in valid:
        raise ConfigError(f"{what}={value!r} is not valid; choose one of: {', '.join(valid)}")


def _positive(value: int, what: str) -> None:
    if value < 1:
        raise ConfigError(f"{what}={value} must be a positive integer")


def _validate_zeroshot(evaluation: EvalConfig) -> None:
    """eval.tasks / eval.kl knobs; whether each task's data is there is checked when the run
    resolves its tasks (experiments/evaluation/zeroshot/tasks.py), still before the model loads."""
    _choice(evaluation.task_source, ("auto", "local", "hub"), "eval.task_source")
    _positive(evaluation.batch_size, "eval.batch_size")
    if evaluation.num_fewshot is not None and evaluation.num_fewshot < 0:
        raise ConfigError(f"eval.num_fewshot={evaluation.num_fewshot} must be 0 or more")
    if evaluation.limit is not None:
        _positive(evaluation.limit, "eval.limit")
    if len(set(evaluation.tasks)) != len(evaluation.tasks):
        raise ConfigError(f"eval.tasks lists a task twice: {evaluation.tasks}")
    if evaluation.fewshot_as_multiturn and not evaluation.apply_chat_template:
        raise ConfigError(
            "eval.fewshot_as_multiturn=true needs eval.apply_chat_template=true: few-shot examples become chat "
            "turns only inside a chat template (lm-eval refuses it too); set both, or drop fewshot_as_multiturn"
        )
    kl = evaluation.kl
    _positive(kl.top_k, "eval.kl.top_k")
    if kl.tail_samples < 0:
        raise ConfigError(f"eval.kl.tail_samples={kl.tail_samples} must be 0 (lower bound) or more")
    if kl.max_windows is not None:
        _positive(kl.max_windows, "eval.kl.max_windows")
    for dataset in kl.datasets or []:
        if dataset not in evaluation.ppl.datasets:
            raise ConfigError(
                f"eval.kl.datasets names {dataset!r}, which eval.ppl.datasets ({evaluation.ppl.datasets}) does "
                "not evaluate: KL is computed inside the perplexity pass"
            )


def validate_method(section: dict[str, Any]) -> tuple[str, MethodConfig]:
    """A resolved method section -> (name, its registered config dataclass, validated)."""
    name = section.get("name")
    if name is None:
        raise ConfigError("config group 'method' has no 'name'")
    method_class = quantlab.methods.get_method_class(str(name))
    body = {k: v for k, v in section.items() if k != "name"}
    config = _typed(method_class.config_class, body, f"method/{name}")
    config.validate(str(name))
    return str(name), config


def model_spec(section: Any) -> ModelSpec:
    spec = _typed(ModelSpec, section, "model")
    _choice(spec.source, MODEL_SOURCES, "model.source")
    if spec.dtype != "auto":
        _choice(spec.dtype, tuple(DTYPES), "model.dtype")
    return spec


def _comparisons(resolved: dict, group_loader: Any) -> list[tuple[str, MethodConfig]]:
    """`compare_with`: other methods run beside the main one at the same bits and group size,
    each with its own config group's defaults (the quickstart shows RTN beside GPTQ)."""
    names = resolved.get("compare_with") or []
    if names and group_loader is None:
        raise ConfigError("compare_with needs a loader for method config groups")
    comparisons = []
    for name in names:
        section = OmegaConf.create(
            {"bits": resolved["bits"], "group_size": resolved["group_size"], "method": group_loader("method", name)}
        )
        comparisons.append(validate_method(OmegaConf.to_container(section, resolve=True)["method"]))
    return comparisons


def validate(cfg: DictConfig, group_loader: Any = None) -> RunConfig:
    """Check every group of a composed config; raise ConfigError naming the problem and the fix.
    `group_loader(group, name)` reads another option of a config group (random models borrow a
    tokenizer from a model config; `compare_with` names method configs)."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"config does not resolve: {error}") from None
    assert isinstance(resolved, dict)
    check_top_level(resolved)  # unknown keys, types, names that become paths (experiments/run/checks.py)
    model = model_spec(resolved["model"])
    method_name, method = validate_method(resolved["method"])
    calib = _typed(CalibConfig, resolved["calib"], "calib")
    check_calib(calib)
    evaluation = _typed(EvalConfig, resolved["eval"], "eval")
    for dataset in evaluation.ppl.datasets:
        _choice(dataset, EVAL_DATASETS, "eval.ppl.datasets entry")
    _positive(evaluation.ppl.seqlen, "eval.ppl.seqlen")
    _positive(evaluation.ppl.batch_size, "eval.ppl.batch_size")
    if evaluation.ppl.max_windows is not None:
        _positive(evaluation.ppl.max_windows, "eval.ppl.max_windows")
    _validate_zeroshot(evaluation)
    _choice(evaluation.backend, EVAL_BACKENDS, "eval.backend")
    _choice(evaluation.kernel, EVAL_KERNELS, "eval.kernel")
    logger = _typed(LoggerConfig, resolved["logger"], "logger")
    _choice(logger.name, ("none", "wandb"), "logger")
    _choice(logger.mode, ("online", "offline", "disabled"), "logger.mode")
    paths = _typed(PathsConfig, resolved["paths"], "paths")
    expected = None
    if resolved.get("expected") is not None:
        expected = _typed(ExpectedConfig, resolved["expected"], "expected")
        for dataset in expected.ppl:
            if dataset not in evaluation.ppl.datasets:
                raise ConfigError(
                    f"expected.ppl names {dataset!r}, which eval.ppl.datasets ({evaluation.ppl.datasets}) does not evaluate"
                )
    if model.source == "quantized":
        _check_saved_model(model)
    save_model = resolved.get("save_model", False)
    if not isinstance(save_model, bool):
        raise ConfigError(f"save_model={save_model!r} must be true or false")
    export = _typed(ExportConfig, resolved.get("export") or {}, "export")
    if export.format is not None:
        from quantlab.experiments.export.layout import EXPORT_FORMATS

        _choice(export.format, EXPORT_FORMATS, "export.format")
    _choice(export.checkpoint_format, ("gptq", "gptq_v2"), "export.checkpoint_format")
    tokenizer_model = None
    if model.source == "random":
        if not model.tokenizer:
            raise ConfigError(f"model {model.name!r} is random: set model.tokenizer to a model config name")
        if group_loader is None:
            raise ConfigError("random models need a loader for the model they borrow a tokenizer from")
        tokenizer_model = model_spec(group_loader("model", model.tokenizer))
    act = _typed(ActConfig, resolved.get("act") or {}, "act")
    observer = _typed(ObserverConfig, resolved.get("observer") or {}, "observer")
    _validate_act(act, observer)
    kv = _typed(KVConfig, resolved.get("kv") or {}, "kv")
    _validate_kv(kv)
    comparisons = _comparisons(resolved, group_loader)
    plan, items = _allocation(resolved, method, model)
    modules, comparison_modules = _module_rules(items, method_name, method, comparisons, model)
    sensitivity = None
    if resolved.get("sensitivity") is not None:
        sensitivity = _typed(SensitivityConfig, resolved["sensitivity"], "sensitivity")
        check_sensitivity(sensitivity, method_name, method, evaluation.ppl.datasets, bool(items), bool(comparisons))
    return RunConfig(
        model=model, method_name=method_name, method=method, calib=calib, eval=evaluation, logger=logger,
        paths=paths, bits=int(resolved["bits"]), group_size=int(resolved["group_size"]),
        seed=int(resolved["seed"]), name=str(resolved["name"]), tags=list(resolved.get("tags") or []),
        tokenizer_model=tokenizer_model, comparisons=comparisons, expected=expected,
        save_model=save_model, export=export, modules=modules, comparison_modules=comparison_modules,
        act=act, observer=observer, sensitivity=sensitivity, allocation=plan, kv=kv,
    )


def _allocation(resolved: dict, method: MethodConfig, model: ModelSpec
                ) -> tuple[allocation_.AllocationPlan | None, list[Any]]:
    """`allocation.*`: off (the run's own `modules`), or the plan and the rules it writes."""
    items = resolved.get("modules") or []
    config = _typed(allocation_.AllocationConfig, resolved.get("allocation") or {}, "allocation")
    allocation_.check_config(config)
    if config.target_bits is None:
        return None, items
    if items:
        raise ConfigError("allocation.target_bits writes the per-module rules itself: drop modules= / rules=")
    if resolved.get("sensitivity") is not None:
        raise ConfigError("experiment=sensitivity measures; allocation.target_bits uses its record in another run: "
                          "drop one of them")
    plan = allocation_.plan(config, model, method.group_size)
    return plan, plan.rules


def _module_rules(
    items: Any, method_name: str, method: MethodConfig, comparisons: list[tuple[str, MethodConfig]],
    model: ModelSpec,
) -> tuple[list[ModuleRule], dict[str, list[ModuleRule]]]:
    """`modules` (or an allocation's rules): parsed for the run's method and, without their method
    knobs, for each compare_with."""
    if not isinstance(items, list):
        raise ConfigError(f"modules={items!r} must be a list of rules, e.g. 'modules=[{{match: down_proj, bits: 8}}]'")
    if not items:
        return [], {}
    methods_class = quantlab.methods.get_method_class(method_name)
    if not methods_class.quantizes_weights or methods_class.runtime is not None:
        raise ConfigError(f"modules sets per-module weight settings, which method={method_name} does not take: "
                          "drop modules")
    if model.source == "quantized":
        raise ConfigError("modules applies when a run quantizes; model.source=quantized reloads weights already "
                          "quantized: drop modules")
    rules = parse_rules(items, method_name, method)
    per_comparison = {}
    for name, config in comparisons:
        knobs = [i for i, item in enumerate(items) if isinstance(item, dict) and item.get("method")]
        if knobs:
            raise ConfigError(f"modules[{knobs[0]}] sets {method_name} knobs, which compare_with={name} cannot take: "
                              "drop compare_with, or keep the rules to bits, group_size and skip")
        per_comparison[name] = parse_rules(items, name, config)
    return rules, per_comparison


def _check_saved_model(model: ModelSpec) -> None:
    """model.source=quantized: model.path must be a folder saved by save_model=true."""
    from quantlab.experiments.models.quantized import NotAQuantizedModel, read_quant_config

    if not model.path:
        raise ConfigError("model.source=quantized needs model.path: a folder saved by a run with save_model=true")
    try:
        read_quant_config(Path(model.path).expanduser())
    except NotAQuantizedModel as error:
        raise ConfigError(f"model.path: {error}") from None
