"""The command line's typos, explained before Hydra runs: a key that is not in the config
(`method.act_ordr=true`, `calib.nsample=64`) or an option a config group does not have
(`method=gtpq`) gets a message naming the group's valid keys or options and the closest one,
instead of Hydra's bare "Key ... is not in struct". `quantlab.experiments.run.cli.main` prints it as a
config error (exit 2) before Hydra makes a run directory; a sweep's jobs get the same messages
from `quantlab.experiments.run.callbacks.check_sweep`.

Keys added with `+` are not Hydra's business: the typed schemas (experiments/run/schema.py)
refuse those, with the same wording (`quantlab.experiments.run.checks.unknown_key_message`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from quantlab.experiments.run.checks import closest, top_level_key_message, unknown_key_message

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Hydra's command-line flags that quantlab's check leaves alone (help, --cfg, other config dirs)
_PLAIN_FLAGS = ("-m", "--multirun")

Compose = Callable[[list[str]], DictConfig]  # overrides -> the composed config, hydra node included


def group_options(group: str, found: list[str] | None = None) -> list[str]:
    """The options of a config group: Hydra's list (`found`) and every YAML under conf/<group>,
    nested ones by their path (experiment=smollm2/gptq_vs_rtn)."""
    folder = CONF_DIR / group
    nested = [str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml")] if folder.is_dir() else []
    return sorted(set(found or []) | set(nested))


def _strip(key: str) -> str:
    return key.lstrip("+~")


def missing_option_message(error: Any, overrides: list[str]) -> str:
    """`method=gtpq`: Hydra's MissingConfigException, as the option the user named, the closest
    option of that group and all of them."""
    missing = str(getattr(error, "missing_cfg_file", "") or "")
    group, _, option = missing.rpartition("/")
    for line in overrides:  # the override that named it: nested options keep their path
        key, sep, value = line.partition("=")
        if sep and missing == f"{_strip(key)}/{value}":
            group, option = _strip(key), value
    options = group_options(group, list(getattr(error, "options", None) or []))
    match = closest(option, options)
    hint = f"; did you mean {match}?" if match else "."
    return f"{group}={option} names no option of config group {group!r}{hint} Valid: {', '.join(_listing(options, option))}"


def _listing(options: list[str], option: str) -> list[str]:
    """The options beside the one typed: those of its folder (smollm2/...), others by folder."""
    folder = option.rpartition("/")[0]
    base = f"{folder}/" if folder and any(o.startswith(f"{folder}/") for o in options) else ""
    shown = set()
    for name in options:
        if name.startswith(base):
            head, nested, _ = name[len(base):].partition("/")
            shown.add(base + head + ("/..." if nested else ""))
    return sorted(shown)


def key_message(cfg: DictConfig, key: str) -> str:
    """`key` (dotted) is not in the composed `cfg`: the first part of it that is not, with the
    valid keys there. For a group, those of its typed schema too (for `method`, the selected
    method's knobs); a knob the schema has but the group's YAML does not list is added with `+`."""
    from quantlab.experiments.run.schema import group_schema, schema_keys

    parts = key.split(".")
    if parts[0] not in cfg:
        return top_level_key_message([parts[0]])
    group, node = parts[0], cfg[parts[0]]
    choice = cfg.hydra.runtime.choices.get(group) if "hydra" in cfg else None
    owner = f"{group}={choice}" if choice and group == "method" else group
    schema = group_schema(group, node)
    depth = 1
    while depth < len(parts) - 1 and isinstance(node, DictConfig) and parts[depth] in node:
        node, depth = node[parts[depth]], depth + 1
    bad, inner = ".".join(parts[: depth + 1]), ".".join(parts[1:depth])
    if not isinstance(node, DictConfig):
        return f"{'.'.join(parts[:depth])} is a value, not a section with keys: {key} cannot be set"
    typed = (schema_keys(schema, inner) or []) if schema is not None else []
    if parts[depth] in typed:
        return (f"{bad} is a knob of {owner} that its config file does not list, so Hydra needs it added: "
                f"+{key}=VALUE")
    return unknown_key_message(bad, [*map(str, node.keys()), *typed], owner)


def composition_message(error: BaseException, overrides: list[str], compose: Compose) -> str | None:
    """The message for a config Hydra could not compose from `overrides`, or None when the
    failure is not a mistyped key or option (Hydra's own message is kept then)."""
    from hydra.errors import MissingConfigException

    if isinstance(error, MissingConfigException):
        return missing_option_message(error, overrides)
    key = str(getattr(error.__cause__, "full_key", None) or "")
    typed = [_strip(line.partition("=")[0]) for line in overrides]
    culprits = [k for k in typed if key and (k == key or k.startswith(f"{key}."))]
    if not culprits:
        return None  # not a command-line key (a config file's own)
    rest = [line for line, k in zip(overrides, typed) if k not in culprits]
    try:
        cfg = compose(rest)
    except Exception as other:  # noqa: BLE001 - another typo: report that one first
        return composition_message(other, rest, compose)
    return key_message(cfg, culprits[0])


def override_problem(argv: list[str], config_name: str = "config") -> str | None:
    """What is mistyped on the command line `argv`, or None (also when Hydra flags other than
    -m are given: Hydra handles those). For a sweep, its first job (the sweep's callback checks
    every job)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if any(arg.startswith("-") and arg not in _PLAIN_FLAGS for arg in argv) or GlobalHydra.instance().is_initialized():
        return None
    multirun = any(arg in _PLAIN_FLAGS for arg in argv)
    lines = [arg for arg in argv if arg not in _PLAIN_FLAGS]
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except HydraException:
        return None  # a syntax error: Hydra's message shows where
    if any(o.is_sweep_override() for o in parsed) and not multirun:
        return None  # Hydra explains a sweep without -m
    overrides = [o.input_line for o in parsed]
    if multirun:  # the sweep's first job; check_sweep explains the others
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        overrides = list(BasicSweeper.split_arguments(parsed, None)[0][0])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        def composed(lines: list[str]) -> DictConfig:
            return compose(config_name=config_name, overrides=lines, return_hydra_config=True)

        try:
            composed(overrides)
        except Exception as error:  # noqa: BLE001 - explained if it is a typo, else left to Hydra
            return composition_message(error, overrides, composed)
    return None
