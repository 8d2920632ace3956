"""AWQ (Lin et al., MLSys'24) as llm-awq `run_awq` does it, block by block (reference/methods.md §4.3).

Per block, with the block's inputs coming from the full-precision previous block
(`propagation = "float"`, reference/methods.md §1.1):
1. statistics: one pass records every linear's input and each inspected module's calls
   (the whole attention with the masks and position embeddings it gets inside the block);
2. scale search: each scaling group the architecture adapter declares is searched on the
   *unscaled* block (methods/awq_search.py); a linear-to-linear group whose widths differ
   is skipped (llm-awq skips v_proj -> o_proj under grouped-query attention, llm-awq PR #67);
3. all scales are folded into the preceding norm or linear (exact in full precision), and the
   cached input features are divided by them;
4. clip search (`clip`, default on) for every linear except q/k ("qk bmm is hard to clip");
5. every linear is quantized on the raw min-max grid and committed as a `QuantizedWeight`.

`duo_scaling=True` switches to AutoAWQ's scale formula (its default; llm-awq's is the default here).
Each committed linear records what was chosen ("scale": alpha, losses; "clip": shrink statistics)
and its share of the time: stats_seconds, scale_seconds, clip_seconds, quant_seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from quantlab.methods import awq_search
from quantlab.methods.base import ConfigError, Method, MethodConfig, register
from quantlab.methods.block import BlockView, ScalingGroup
from quantlab.methods.rtn import round_to_nearest

# llm-awq skips "q_" and "k_"; AutoAWQ also "query", "key" and "Wqkv" (methods.md §4.3 step 4).
NO_CLIP_MARKERS = ("q_", "k_", "query", "key", "Wqkv")


@dataclass
class AWQConfig(MethodConfig):
    duo_scaling: bool = False  # AutoAWQ's x^a / w^(1-a); False is llm-awq (and the paper)
    scale: bool = True  # llm-awq `auto_scale`
    clip: bool = True  # llm-awq `mse_range` / AutoAWQ `apply_clip`
    n_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512  # about this many tokens (a stride over all of them) for the clip search
    clip_row_chunk: int = 256  # output rows per clip step: memory only, the result is the same

    def validate(self, method_name: str) -> None:
        super().validate(method_name)
        if self.n_grid < 1:
            raise ConfigError(
                f"method {method_name!r}: n_grid={self.n_grid} must be >= 1 (20 in the reference)"
            )
        if not 0 <= self.max_shrink < 1:
            raise ConfigError(
                f"method {method_name!r}: max_shrink={self.max_shrink} must be in [0, 1) (0.5 in the reference)"
            )
        if self.clip and int(self.max_shrink * self.n_grid) < 1:
            raise ConfigError(
                f"method {method_name!r}: clip=true tries int(max_shrink * n_grid) clamps, which is 0 here; "
                "raise max_shrink or n_grid, or set clip=false"
            )
        for knob in ("clip_tokens", "clip_row_chunk"):
            if getattr(self, knob) < 1:
                raise ConfigError(f"method {method_name!r}: {knob}={getattr(self, knob)} must be >= 1")


def skip_reason(group: ScalingGroup, block: BlockView) -> str | None:
    """Why a scaling group cannot be folded exactly in this block, or None.

    llm-awq scales v_proj -> o_proj only when the two weights have the same shape; for the
    families here that is v_proj's output width equal to o_proj's input width, which grouped-
    query attention breaks (SmolLM2: 192 != 576)."""
    prev = block.submodule(group.prev_op)
    if isinstance(prev, nn.Linear):
        widths = {block.linears[name].in_features for name in group.linears}
        if widths != {prev.out_features}:
            return (
                f"{group.prev_op} outputs {prev.out_features} channels but {', '.join(group.linears)} "
                f"take {sorted(widths)} (grouped-query attention): skipped, as llm-awq"
            )
    return None


@dataclass
class BlockState:
    """What the scaling steps hand the clip-and-commit steps: per linear, the record so far, the
    time spent per stage, and the subsampled (scale-divided) input features for the clip search."""

    info: dict[str, dict]
    seconds: dict[str, dict[str, float]]
    clip_x: dict[str, torch.Tensor] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@register("awq")
class AWQ(Method):
    config_class = AWQConfig
    propagation = "float"
    folds_scales = True

    @torch.no_grad()
    def quantize_block(self, block: BlockView) -> None:
        self.clip_and_commit(block, self.scale_block(block))

    @torch.no_grad()
    def scale_block(self, block: BlockView) -> BlockState:
        """Steps 1-3: statistics, the scale search and the exact fold (no weight is quantized)."""
        cfg = self.config
        names = list(block.linears)
        device = block.linears[names[0]].weight.device
        info: dict[str, dict] = {name: {} for name in names}
        seconds = {name: dict.fromkeys(("stats", "scale", "clip", "quant"), 0.0) for name in names}

        # 1. Statistics: each linear's inputs and each inspected module's calls, in one pass.
        start = time.perf_counter()
        groups = list(block.scaling_groups) if cfg.scale else []
        inspected = [g.inspect for g in groups if g.inspect not in block.linears]
        calls = block.capture(names + list(dict.fromkeys(inspected)))
        clip_names = [n for n in names if cfg.clip and not any(m in n for m in NO_CLIP_MARKERS)]
        clip_x = {
            n: awq_search.subsample_tokens([c.input for c in calls[n]], cfg.clip_tokens) for n in clip_names
        }
        _sync(device)
        self._share(seconds, names, "stats", time.perf_counter() - start)

        # 2. Scale search, every group on the unscaled block.
        found: list[tuple[ScalingGroup, awq_search.ScaleSearch]] = []
        for group in groups:
            reason = skip_reason(group, block)
            if reason is not None:
                for name in group.linears:
                    info[name]["scale"] = {"prev_op": group.prev_op, "skipped": reason}
                continue
            start = time.perf_counter()
            linears = [block.linears[name] for name in group.linears]
            x_mean = awq_search.activation_mean([c.input for c in calls[group.linears[0]]])
            w_mean = (
                awq_search.weight_mean([lin.weight for lin in linears], cfg.group_size)
                if cfg.duo_scaling
                else None
            )
            search = awq_search.search_group_scales(
                block.submodule(group.inspect),
                calls[group.inspect],
                linears,
                x_mean,
                cfg.bits,
                cfg.group_size,
                cfg.n_grid,
                w_mean,
            )
            found.append((group, search))
            for name in group.linears:
                info[name]["scale"] = {
                    "prev_op": group.prev_op,
                    "group": list(group.linears),
                    "inspect": group.inspect,
                    "alpha": search.alpha,
                    "loss": search.loss,
                    "loss_alpha0": search.losses[0],
                    "losses": search.losses,
                    "s_min": float(search.scales.min()),
                    "s_max": float(search.scales.max()),
                }
            _sync(device)
            self._share(seconds, group.linears, "scale", time.perf_counter() - start)
        for name in names:
            info[name].setdefault("scale", {"skipped": "in no scaling group" if cfg.scale else "scale=false"})
        del calls

        # 3. Fold all scales; the clip features follow the scaled weights.
        for group, search in found:
            linears = [block.linears[name] for name in group.linears]
            awq_search.fold_scales(block.submodule(group.prev_op), linears, search.scales)
            for name in group.linears:
                if name in clip_x:
                    clip_x[name] = clip_x[name] / search.scales.to(clip_x[name].device)[None, :]
        return BlockState(info, seconds, clip_x)

    @torch.no_grad()
    def clip_and_commit(self, block: BlockView, state: BlockState) -> None:
        """Steps 4-5: the clip search, then quantize and commit every linear."""
        cfg, info, seconds, clip_x = self.config, state.info, state.seconds, state.clip_x
        names = list(block.linears)
        device = block.linears[names[0]].weight.device
        grid = awq_search.awq_grid(cfg.bits)
        for name in names:
            weight = block.linears[name].weight.detach().float()
            if name in clip_x:
                start = time.perf_counter()
                x = clip_x.pop(name)
                clip = awq_search.clip_search(
                    weight, x, cfg.bits, cfg.group_size, cfg.n_grid, cfg.max_shrink, cfg.clip_row_chunk
                )
                weight = awq_search.apply_clip(weight, clip.max_val, cfg.group_size)
                info[name]["clip"] = {
                    "tokens": x.shape[0],
                    "clipped_groups": int((clip.shrink > 0).sum()),
                    "groups": clip.shrink.numel(),
                    "mean_shrink": float(clip.shrink.mean()),
                    "err": float(clip.err.sum()),
                    "err_unclipped": float(clip.err_unclipped.sum()),
                }
                _sync(device)
                seconds[name]["clip"] = time.perf_counter() - start
            else:
                info[name]["clip"] = {"skipped": "clip=false" if not cfg.clip else "q/k are never clipped"}
            start = time.perf_counter()
            qweight = round_to_nearest(weight, grid, cfg.group_size)
            _sync(device)
            seconds[name]["quant"] = time.perf_counter() - start
            parts = seconds[name]
            block.commit(
                name,
                qweight,
                seconds=sum(parts.values()),
                **{f"{key}_seconds": value for key, value in parts.items()},
                **info[name],
            )

    @staticmethod
    def _share(seconds: dict[str, dict[str, float]], names, key: str, elapsed: float) -> None:
        """Charge a pass that served several linears to each of them equally (as GPTQ does)."""
        names = list(names)
        for name in names:
            seconds[name][key] += elapsed / len(names)
