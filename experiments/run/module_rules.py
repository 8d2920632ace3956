"""Per-module rules: an ordered list that gives each decoder linear its own settings.

    modules:
      - {match: 'layers\\.0\\.', bits: 8}                  # the first block at 8 bits
      - {match: 'down_proj', skip: true}                  # every down_proj left in full precision
      - {match: 'self_attn', group_size: 64, method: {damp: 0.05}}

Each rule is `match` (a regular expression searched in the module's full path, e.g.
`model.layers.3.mlp.down_proj`; anchor it with ^ / $ or escape the dots for exactness) plus either
`skip: true` or overrides of `bits`, `group_size` and `method` knobs. The first rule that matches a
linear decides it; a linear no rule matches keeps the run's method config. Every rule is checked
before anything expensive: its keys, its regex, the config it makes (validated by the method as any
config), that it matches at least one linear and that an earlier rule does not take every linear it
matches.

The driver quantizes a block in segments: maximal runs of consecutive linears (in execution order)
that share a rule, each by the method built from that rule's config, on a view of the block that
shows only the segment's linears. A later segment sees the earlier ones already quantized (as
true-sequential GPTQ does), skipped linears stay as they are, and only the block's last segment
may end the block's calibration passes. A method that scales linears together (AWQ's and
SmoothQuant's groups) needs every linear of a group in one segment: a rule that splits one is refused.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from quantlab.methods import ConfigError, MethodConfig, get_method_class

# what a rule's config may not change, because the driver applies it to the whole run
RUN_WIDE = ("needs_calibration", "propagation", "sequences_per_forward")

RULE_KEYS = ("match", "skip", "bits", "group_size", "method")
SKIPPED_BITS = 16  # a skipped linear is counted at fp16 in avg_bits


@dataclass(frozen=True)
class ModuleRule:
    index: int
    match: str
    pattern: re.Pattern = field(compare=False, repr=False)
    skip: bool = False
    config: MethodConfig | None = None  # the method config this rule's linears get (None when skipped)
    overrides: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "match": self.match, "skip": self.skip, **self.overrides}


def parse_rules(items: list[Any] | None, method_name: str, base: MethodConfig) -> list[ModuleRule]:
    """Validate `modules` and build each rule's method config. Errors name the rule and the fix."""
    rules: list[ModuleRule] = []
    for index, item in enumerate(items or []):
        where = f"modules[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} must be a mapping like {{match: 'down_proj', bits: 8}}, got {item!r}")
        unknown = sorted(set(item) - set(RULE_KEYS))
        if unknown:
            raise ConfigError(f"{where} has unknown keys {unknown}; valid: {', '.join(RULE_KEYS)}")
        match = item.get("match")
        if not isinstance(match, str) or not match:
            raise ConfigError(f"{where} needs `match`: a regular expression searched in module paths, e.g. 'down_proj'")
        try:
            pattern = re.compile(match)
        except re.error as exc:
            raise ConfigError(f"{where}: match={match!r} is not a valid regular expression ({exc})") from None
        skip = item.get("skip", False)
        if not isinstance(skip, bool):
            raise ConfigError(f"{where}: skip must be true or false, got {skip!r}")
        overrides = {key: item[key] for key in ("bits", "group_size") if item.get(key) is not None}
        knobs = item.get("method") or {}
        if not isinstance(knobs, dict):
            raise ConfigError(f"{where}: method must be a mapping of {method_name} knobs, got {knobs!r}")
        if skip:
            if overrides or knobs:
                raise ConfigError(f"{where}: skip=true leaves the linears in full precision; drop "
                                  f"{', '.join(sorted(set(overrides) | {'method'} if knobs else set(overrides)))}")
            rules.append(ModuleRule(index, match, pattern, skip=True))
            continue
        if not overrides and not knobs:
            raise ConfigError(f"{where} changes nothing: give bits, group_size, method knobs or skip: true")
        valid = {f.name for f in dataclasses.fields(base)}
        bad = sorted(set(knobs) - valid)
        if bad:
            raise ConfigError(f"{where}: {method_name} has no knob {bad}; valid: {', '.join(sorted(valid))}")
        held = sorted(set(knobs) & set(get_method_class(method_name).run_wide_knobs))
        if held:
            raise ConfigError(f"{where} sets {held} of {method_name}, which hold for the whole run: set them on "
                              "method. instead")
        try:
            config = dataclasses.replace(base, **overrides, **knobs)
        except TypeError as exc:  # a frozen or init=False field
            raise ConfigError(f"{where}: {exc}") from None
        try:
            config.validate(method_name)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        method_class = get_method_class(method_name)
        ours, theirs = method_class(config), method_class(base)
        for attr in RUN_WIDE:
            if getattr(ours, attr) != getattr(theirs, attr):
                raise ConfigError(f"{where} changes {attr} of {method_name} ({getattr(theirs, attr)} -> "
                                  f"{getattr(ours, attr)}), which holds for the whole run: set it on method. instead")
        rules.append(ModuleRule(index, match, pattern, config=config, overrides={**overrides, **({"method": knobs} if knobs else {})}))
    return rules


def rule_for(rules: list[ModuleRule], path: str) -> ModuleRule | None:
    """The first rule whose regex is found in `path`, or None (the run's method config)."""
    for rule in rules:
        if rule.pattern.search(path):
            return rule
    return None


def check_matches(rules: list[ModuleRule], paths: list[str]) -> dict[int, list[str]]:
    """Each rule's linears among `paths` (the model's decoder linears); a rule that matches none, or
    whose every match an earlier rule already took, is an error naming a few real paths."""
    taken: dict[int, list[str]] = {rule.index: [] for rule in rules}
    for path in paths:
        rule = rule_for(rules, path)
        if rule is not None:
            taken[rule.index].append(path)
    for rule in rules:
        if taken[rule.index]:
            continue
        examples = ", ".join(paths[:2] + paths[-1:])
        shadowed = [p for p in paths if rule.pattern.search(p)]
        if shadowed:
            first = rule_for(rules, shadowed[0])
            raise ConfigError(
                f"modules[{rule.index}] (match={rule.match!r}) never applies: every linear it matches "
                f"(e.g. {shadowed[0]}) is taken by modules[{first.index}] first (the first matching rule wins): "
                "reorder the rules or narrow the earlier one")
        raise ConfigError(
            f"modules[{rule.index}] (match={rule.match!r}) matches no decoder linear of this model; "
            f"paths look like {examples} (the regex is searched in the full path)")
    return taken


def segments(rules: list[ModuleRule], block_name: str, names: list[str]) -> list[tuple[ModuleRule | None, list[str]]]:
    """The block's linears (`names`, in execution order) cut into maximal runs that share a rule."""
    out: list[tuple[ModuleRule | None, list[str]]] = []
    for name in names:
        rule = rule_for(rules, f"{block_name}.{name}")
        if out and out[-1][0] is rule:
            out[-1][1].append(name)
        else:
            out.append((rule, [name]))
    return out


def linear_paths(blocks_prefix: str, n_blocks: int, names: list[str]) -> list[str]:
    """Every decoder linear's full path, block by block in execution order."""
    return [f"{blocks_prefix}.{i}.{name}" for i in range(n_blocks) for name in names]


def check_folded_groups(rules: list[ModuleRule], blocks_prefix: str, n_blocks: int, names: list[str],
                        scaling_groups: Any, method_name: str) -> None:
    """A method that folds scales (AWQ, SmoothQuant) rescales a scaling group's linears and the
    linear before them together: all of them must fall in one segment of every block."""
    for i in range(n_blocks):
        block = f"{blocks_prefix}.{i}"
        segment_of = {}
        for number, (_rule, members) in enumerate(segments(rules, block, names)):
            for name in members:
                segment_of[name] = number
        for group in scaling_groups:
            together = [n for n in (group.prev_op, *group.linears) if n in segment_of]
            if len({segment_of[n] for n in together}) > 1:
                settings = ", ".join(f"{n}: {_label(rule_for(rules, block + '.' + n))}" for n in together)
                raise ConfigError(
                    f"method {method_name} scales {', '.join(together)} of {block} together, but the modules rules "
                    f"give them different settings ({settings}): give the whole group the same rule")


def _label(rule: ModuleRule | None) -> str:
    return "the run's config" if rule is None else f"modules[{rule.index}]"


def check_model(rules: list[ModuleRule], arch: Any, model: Any, method_class: Any) -> None:
    """Every rule against the loaded model's decoder linears (matches, shadowing) and, for a method
    that folds scales, against its scaling groups."""
    if not rules:
        return
    n_blocks = len(arch.block_list(model))
    check_matches(rules, linear_paths(arch.blocks, n_blocks, list(arch.linears)))
    if getattr(method_class, "folds_scales", False):
        check_folded_groups(rules, arch.blocks, n_blocks, list(arch.linears), arch.scaling_groups, method_class.name)


def summary(rules: list[ModuleRule], layers: list[Any], skipped: dict[str, Any]) -> list[dict[str, Any]]:
    """The record's `module_rules`: each rule, the linears it got and their exact bits per weight."""
    out = []
    for rule in rules:
        if rule.skip:
            names = sorted(name for name in skipped if rule.pattern.search(name) and rule_for(rules, name) is rule)
            out.append({**rule.describe(), "linears": len(names), "names": names})
            continue
        mine = [layer for layer in layers if layer.info.get("rule") == rule.index]
        numel = sum(layer.shape[0] * layer.shape[1] for layer in mine)
        out.append({**rule.describe(), "linears": len(mine), "names": [layer.name for layer in mine],
                    "bits_per_weight": sum(layer.storage_bits for layer in mine) / numel if numel else None})
    return out
