"""SmoothQuant (Xiao et al., ICML'23) as mit-han-lab/smoothquant does it: migrate activation
outliers into the weights with a per-channel scale folded into the preceding norm, then quantize
the weights to 8 bits per output channel. The reference W8A8 method every W8A8 result is read against.

Symbols: X the input of a norm's linears [tokens, C_in], W_f each of those linears' weight
[C_out, C_in]; alpha the migration strength (`alpha`, 0.5). Per block, on the full-precision
model (`propagation = "float"`: the reference collects every layer's statistics in one
full-precision pass, `smoothquant:calibration.py get_act_scales`):

1. statistics: a_j = max over calibration tokens of |X_j|, per input channel j, a running max over
   the calibration chunks (the reference: 512 pile-val texts of at most 512 tokens, one at a time);
2. smoothing factors: w_j = max(max over f, i of |W_f,ij|, 1e-5) and
   s_j = max(a_j^alpha / w_j^(1 - alpha), 1e-5) (`smooth.py smooth_ln_fcs_llama_like`);
3. fold: the norm's weight (and bias) divided by s, each linear's input column j multiplied by s_j
   (methods/awq_search.py `fold_scales`, exact in full precision). Only norm -> linears groups are
   smoothed, as in the reference (q/k/v after the attention norm, gate/up or fc1 after the MLP
   norm); o_proj and down_proj keep their inputs;
4. every linear quantized round-to-nearest, symmetric absmax per output channel: scale =
   max(max_i |W_ij|, 1e-5) / (2^(b-1) - 1), codes round(W / scale) in [-(2^(b-1) - 1), 2^(b-1) - 1]
   (`fake_quant.py quantize_weight_per_channel_absmax`; AWQ's symmetric raw grid in methods/quantizer.py).

The activations' 8-bit per-token quantization is the evaluated model's input quantizer, not a
weight transform: it composes with any method. The reference computes in fp16; here the statistics,
the factors and the grid are fp32. Each linear records the factors of its group (s min / max, the
largest a_j) and its share of the time: stats_seconds, smooth_seconds, quant_seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from quantlab.methods.awq_search import fold_scales
from quantlab.methods.base import ConfigError, Method, MethodConfig, register
from quantlab.methods.block import BlockView, ScalingGroup
from quantlab.methods.observers import MinMaxObserver
from quantlab.methods.quantizer import Grid
from quantlab.methods.rtn import round_to_nearest

SCALE_FLOOR = 1e-5  # smooth.py clamps both the weight maxima and the factors at 1e-5


@dataclass
class SmoothQuantConfig(MethodConfig):
    bits: int = 8
    group_size: int = -1  # per output channel, as the reference (fake_quant.py per_channel)
    alpha: float = 0.5  # migration strength; the paper's LLaMA / OPT default
    smooth: bool = True  # false: the same W8 grid without migration (the ablation)

    def validate(self, method_name: str) -> None:
        super().validate(method_name)
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"method {method_name!r}: alpha={self.alpha} must be in [0, 1] (0.5 in the reference)")


def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max(a_j^alpha / max(max_{f,i} |W_f,ij|, 1e-5)^(1 - alpha), 1e-5), [C_in] fp32."""
    w_absmax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    w_absmax = w_absmax.clamp(min=SCALE_FLOOR)
    return (act_absmax.float().pow(alpha) / w_absmax.pow(1 - alpha)).clamp(min=SCALE_FLOOR)


def channel_absmax(observer: MinMaxObserver) -> torch.Tensor:
    """a_j = max over the tokens seen of |x_j|, from a per-channel min-max observer's range."""
    lo, hi = observer.range()
    return torch.maximum(-lo, hi)


def smoothed_groups(block: BlockView) -> list[ScalingGroup]:
    """The scaling groups SmoothQuant folds: those after a norm (not linear -> linear)."""
    return [g for g in block.scaling_groups if not isinstance(block.submodule(g.prev_op), nn.Linear)]


@register("smoothquant")
class SmoothQuant(Method):
    config_class = SmoothQuantConfig
    propagation = "float"
    folds_scales = True

    @torch.no_grad()
    def smooth_block(self, block: BlockView) -> tuple[dict[str, dict], dict[str, dict[str, float]]]:
        """Steps 1-3 (no weight quantized): returns each linear's record and time split."""
        cfg: SmoothQuantConfig = self.config  # type: ignore[assignment]
        info: dict[str, dict] = {name: {} for name in block.linears}
        seconds = {name: {"stats": 0.0, "smooth": 0.0, "quant": 0.0} for name in block.linears}
        groups = smoothed_groups(block) if cfg.smooth else []
        if groups:
            start = time.perf_counter()
            # a group's linears share one input: one running per-channel min / max for it
            stats = {g.linears[0]: MinMaxObserver(per_channel=True) for g in groups}
            block.run(hooks={name: s.update for name, s in stats.items()})
            for group in groups:
                for name in group.linears:
                    seconds[name]["stats"] = (time.perf_counter() - start) / len(block.linears)
            for group in groups:
                start = time.perf_counter()
                linears = [block.linears[name] for name in group.linears]
                act_absmax = channel_absmax(stats[group.linears[0]])
                s = smoothing_factors(act_absmax, [lin.weight for lin in linears], cfg.alpha)
                fold_scales(block.submodule(group.prev_op), linears, s)
                for name in group.linears:
                    info[name]["smooth"] = {
                        "prev_op": group.prev_op, "group": list(group.linears), "alpha": cfg.alpha,
                        "s_min": float(s.min()), "s_max": float(s.max()), "act_absmax_max": float(act_absmax.max()),
                    }
                    seconds[name]["smooth"] = (time.perf_counter() - start) / len(group.linears)
        for name in block.linears:
            info[name].setdefault("smooth", {"skipped": "smooth=false" if not cfg.smooth else "not after a norm"})
        return info, seconds

    @torch.no_grad()
    def quantize_block(self, block: BlockView) -> None:
        cfg: SmoothQuantConfig = self.config  # type: ignore[assignment]
        info, seconds = self.smooth_block(block)
        grid = Grid(cfg.bits, sym=True, zero_in_range=False)  # absmax / (2^(b-1) - 1), codes centred on 2^(b-1)
        for name, linear in block.linears.items():
            start = time.perf_counter()
            qweight = round_to_nearest(linear.weight, grid, cfg.group_size)
            seconds[name]["quant"] = time.perf_counter() - start
            parts = seconds[name]
            block.commit(name, qweight, seconds=sum(parts.values()),
                         **{f"{key}_seconds": value for key, value in parts.items()}, **info[name])
