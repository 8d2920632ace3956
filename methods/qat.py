"""Quantization-aware training (QAT): a short fine-tuning of every quantized linear through its
fake-quant weights, started from a post-training method's result.

Two stages, two hooks:
1. Block by block (`quantize_block`): the init method (`init`: rtn, gptq or awq, built from this
   config's bits / group_size / sym) quantizes the block as it would alone, through the same driver.
2. Whole model (`fine_tune`, the driver's whole-model seam: experiments/run/finetune.py calls it
   once every block is committed, because `fine_tunes` is True). Each quantized linear keeps one
   latent fp32 weight W (its own parameter, holding the init's fake-quant weights, so no copy) and
   the init's grid: scales s and zero-points z per (row, group). Forward uses
   W_hat = s * (clamp(round(W / s) + z, 0, maxq) - z), rounding differentiated by the straight-
   through estimator (kernels/grid.py `fake_quantize_ste`: dW_hat/dW = 1 inside the grid's range,
   0 where the code is clamped). With `learn_scales` the scales are parameters too, LSQ-style
   (Esser et al., ICLR'20): their gradient is LSQ's, times g = 1 / sqrt(N * Q_P), N the weights
   per scale (the group's width) and Q_P the grid's positive levels (maxq - zero of a symmetric
   grid, maxq of an asymmetric one). Zero-points stay at the init's (they are codes).
   The loss is the mean next-token cross-entropy on `batch_size` calibration sequences per step
   (the driver's `loss_fn`), for `steps` steps of `optimizer` (adam, adamw, sgd without momentum)
   at `lr` with a cosine (to 0) or constant schedule; batches are drawn in a `seed`ed shuffled
   order, epoch after epoch. `train`: `linears` (default: only the latent weights and, with
   learn_scales, the scales) or `all_linears_and_norms` (also every norm's parameters and the
   quantized linears' biases, which the driver hands over); embeddings and the head stay frozen.
3. At the end each linear's weight is its grid's codes: codes = clamp(round(W / s) + z), the
   format is the init's `UniformWeight` with those codes and the (learned) scales, so avg_bits is
   exact and the result saves and exports as RTN's does.

Memory: one latent weight per quantized linear (the model's own), the optimizer's state on the
trainable parameters (adam/adamw: two more per parameter; sgd: none) and the activations of one
batch's backward; no other copy of the model: each linear's W_hat is rebuilt in the backward
(`_RecomputedLinear`) instead of kept from the forward. The latents are in the model's dtype (fp32
on the CPU). With lr = 0 the result is the init's, bit for bit.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch
from torch import nn

from quantlab.kernels import UniformWeight
from quantlab.kernels.grid import fake_quantize_ste, quantize
from quantlab.methods.base import ConfigError, Method, MethodConfig, get_method_class, register
from quantlab.methods.block import BlockView

log = logging.getLogger(__name__)

INITS = ("rtn", "gptq", "awq")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")
TRAINED = ("linears", "all_linears_and_norms")


@dataclass
class QATConfig(MethodConfig):
    sym: bool = False  # the grid, as RTN's / GPTQ's sym (AWQ has only the asymmetric grid)
    init: str = "rtn"  # the post-training method whose result training starts from
    steps: int = 200
    lr: float = 1e-5
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    schedule: str = "cosine"
    batch_size: int = 2  # calibration sequences per step
    learn_scales: bool = False
    train: str = "linears"
    seed: int = 0
    supported_bits = (2, 3, 4, 8)  # what every init method can do

    def validate(self, method_name: str) -> None:
        super().validate(method_name)
        if self.init == method_name:
            raise ConfigError(f"method {method_name!r}: init={self.init!r} cannot start from itself; "
                              f"choose one of: {', '.join(INITS)}")
        for knob, valid in (("init", INITS), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("train", TRAINED)):
            if getattr(self, knob) not in valid:
                raise ConfigError(f"method {method_name!r}: {knob}={getattr(self, knob)!r} is not valid; "
                                  f"choose one of: {', '.join(valid)}")
        for knob in ("steps", "batch_size"):
            if getattr(self, knob) < 1:
                raise ConfigError(f"method {method_name!r}: {knob}={getattr(self, knob)} must be a positive integer")
        for knob in ("lr", "weight_decay"):
            if not getattr(self, knob) >= 0:
                raise ConfigError(f"method {method_name!r}: {knob}={getattr(self, knob)} must be >= 0")
        self.init_config().validate(self.init)

    def init_config(self) -> MethodConfig:
        """The init method's config: this run's bits, group_size and (where it has one) sym."""
        config_class = get_method_class(self.init).config_class
        options = {"bits": self.bits, "group_size": self.group_size}
        if "sym" in {f.name for f in fields(config_class)}:
            options["sym"] = self.sym
        elif self.sym:
            raise ConfigError(f"method 'qat': init={self.init!r} has only an asymmetric grid; set sym=false")
        return config_class(**options)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward (the value untouched, so lr = 0 is exact), gradient times g backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, g: float) -> torch.Tensor:
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.g, None


def lsq_gradient_scale(fmt: UniformWeight) -> float:
    """LSQ's g = 1 / sqrt(N * Q_P): N weights per scale (the group's width, the whole row at
    group_size -1), Q_P positive levels (maxq - zero when symmetric, maxq when asymmetric)."""
    maxq = 2**fmt.bits - 1
    per_scale = fmt.shape[1] if fmt.group_size == -1 else min(fmt.group_size, fmt.shape[1])
    positive = maxq - 2 ** (fmt.bits - 1) if fmt.zero_format == "none" else maxq
    return 1.0 / math.sqrt(per_scale * max(positive, 1))


class FakeQuantLinear:
    """One linear in training: its own weight is the latent W, `scale` the grid's (a parameter with
    learn_scales). `attach` makes the linear compute with W_hat, `detach` restores its forward."""

    def __init__(self, linear: nn.Linear, fmt: UniformWeight, learn_scales: bool) -> None:
        supported = fmt.group_bits is None and fmt.n_outliers == 0 and not fmt.per_tensor
        if not supported:
            raise ValueError("QAT trains plain group-wise uniform weights (no per-group widths, outliers or per-tensor grid)")
        self.linear, self.fmt = linear, fmt
        self.index = fmt.g_idx.long().to(linear.weight.device)
        self.zero = fmt.zeros.float().to(linear.weight.device)
        self.scale = nn.Parameter(fmt.scales.float().clone().to(linear.weight.device), requires_grad=learn_scales)
        self.gradient_scale = lsq_gradient_scale(fmt) if learn_scales else None
        self.maxq, self.float_zero = 2**fmt.bits - 1, fmt.zero_format == "float"

    def weight_hat(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """W_hat from the latent `weight` and `scale`, differentiable (STE; LSQ's g on the scale)."""
        if self.gradient_scale is not None:
            scale = _ScaleGradient.apply(scale, self.gradient_scale)
        return fake_quantize_ste(weight, scale[:, self.index], self.zero[:, self.index], self.maxq, self.float_zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _RecomputedLinear.apply(x, self.linear.weight, self.scale, self)
        return y if self.linear.bias is None else y + self.linear.bias

    def attach(self) -> None:
        self.linear.forward = self.forward

    def detach(self) -> None:
        del self.linear.forward  # the class's forward again

    @torch.no_grad()
    def drift(self) -> dict[str, float]:
        """How far training moved this linear from its init: the latent weights in grid steps of
        the init's scales (max and mean |W - W_0| / s_0; a code flips past 0.5 at fixed scales) and
        the scales (mean |s / s_0 - 1|; 0 without learn_scales)."""
        s0 = self.fmt.scales.float().to(self.scale.device)
        w0 = self.fmt.dequantize(torch.float32).to(self.linear.weight.device)
        steps = (self.linear.weight.detach().float() - w0).abs_().div_(s0[:, self.index].clamp(min=torch.finfo(torch.float32).tiny))
        return {"latent_shift_steps_max": float(steps.max()), "latent_shift_steps_mean": float(steps.mean()),
                "scale_change_mean": float((self.scale.detach() / s0 - 1).abs().mean())}

    @torch.no_grad()
    def final_format(self) -> UniformWeight:
        """The grid's codes of the trained W with the trained scales; the linear's weight becomes
        their dequantized values (what evaluation runs)."""
        self.scale.clamp_(min=torch.finfo(torch.float32).tiny)
        scale, zero = self.scale.detach(), self.zero
        w = self.linear.weight.detach().float()
        codes = quantize(w, scale[:, self.index], zero[:, self.index], self.maxq, self.float_zero)
        fmt = replace(self.fmt, codes=codes.to(self.fmt.codes.dtype).cpu(), scales=scale.clone().cpu(),
                      info=dict(self.fmt.info))
        self.linear.weight.data.copy_(fmt.dequantize(torch.float32).to(self.linear.weight))
        return fmt


class _RecomputedLinear(torch.autograd.Function):
    """y = x W_hat^T that keeps only x (and references to W and s) for the backward: W_hat and its
    gradient graph are rebuilt there, one linear at a time, so no weight-sized tensor per linear
    waits in memory between the forward and the backward (autograd through `weight_hat` and
    F.linear would keep about four: the indexed scales and zeros, the codes, W_hat)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, q: FakeQuantLinear) -> torch.Tensor:
        ctx.q = q
        ctx.save_for_backward(x, weight, scale)
        with torch.no_grad():
            return nn.functional.linear(x, q.weight_hat(weight, scale).to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, scale = ctx.saved_tensors
        need_x, need_w, need_s = ctx.needs_input_grad[:3]
        with torch.enable_grad():
            w = weight.detach().requires_grad_(need_w)
            s = scale.detach().requires_grad_(need_s)
            w_hat = ctx.q.weight_hat(w, s)
        grad_x = grad_y @ w_hat.detach().to(grad_y.dtype) if need_x else None
        grad_w = grad_s = None
        leaves = [t for t, need in ((w, need_w), (s, need_s)) if need]
        if leaves:
            grad_w_hat = grad_y.reshape(-1, grad_y.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            grads = list(torch.autograd.grad(w_hat, leaves, grad_w_hat.to(w_hat.dtype)))
            grad_w = grads.pop(0) if need_w else None
            grad_s = grads.pop(0) if need_s else None
        return grad_x, grad_w, grad_s, None


def learning_rate(step: int, steps: int, base: float, schedule: str) -> float:
    """The rate of step `step` (0-based): constant, or cosine from `base` down to 0 at `steps`."""
    if schedule == "constant":
        return base
    return base * 0.5 * (1 + math.cos(math.pi * step / steps))


def batch_order(n_sequences: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The sequence indices of each step: seeded permutations of the calibration set, one after the
    other (an epoch each), cut into batches of `batch_size` (a batch never spans two epochs)."""
    generator = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        batches.extend(torch.randperm(n_sequences, generator=generator).split(batch_size))
    return batches[:steps]


def make_optimizer(config: QATConfig, weights: list[nn.Parameter], scales: list[nn.Parameter]) -> torch.optim.Optimizer:
    """Latent weights (and norms) with weight decay; scales without it (they set the grid's range)."""
    groups = [{"params": weights, "weight_decay": config.weight_decay}]
    if scales:
        groups.append({"params": scales, "weight_decay": 0.0})
    optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[config.optimizer]
    return optimizer_class(groups, lr=config.lr)


@register("qat")
class QAT(Method):
    config_class = QATConfig
    fine_tunes: ClassVar[bool] = True  # the driver calls fine_tune after the block pass
    run_wide_knobs = ("steps", "lr", "optimizer", "weight_decay", "schedule", "batch_size", "learn_scales", "train",
                      "seed")

    def __init__(self, config: QATConfig) -> None:
        super().__init__(config)
        self.init_method = get_method_class(config.init)(config.init_config())
        # the block pass is the init method's: it propagates as that method does
        self.propagation = self.init_method.propagation
        self.sequences_per_forward = self.init_method.sequences_per_forward

    def quantize_block(self, block: BlockView) -> None:
        self.init_method.quantize_block(block)

    def fine_tune(
        self,
        linears: dict[str, nn.Linear],
        formats: dict[str, UniformWeight],
        others: Iterable[nn.Parameter],
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
        sequences: torch.Tensor,
    ) -> tuple[dict[str, UniformWeight], dict[str, Any]]:
        """Train, then return (the final format of every linear, the record: the loss curve as
        [step, loss, lr] rows, steps, seconds, tokens seen, the calibration loss before and after).
        `others`: what `train=all_linears_and_norms` also trains (norms, the linears' biases);
        `loss_fn(ids)`: the model's mean next-token loss on a batch of `sequences` [n, seqlen]."""
        config: QATConfig = self.config
        start = time.perf_counter()
        trained = {name: FakeQuantLinear(linears[name], formats[name], config.learn_scales) for name in formats}
        weights = [q.linear.weight for q in trained.values()]
        if config.train == "all_linears_and_norms":
            weights += [p for p in others if all(p is not w for w in weights)]
        scales = [q.scale for q in trained.values()] if config.learn_scales else []
        for parameter in weights:
            parameter.requires_grad_(True)
        optimizer = make_optimizer(config, weights, scales)
        curve: list[list[float]] = []
        tokens = 0
        for q in trained.values():
            q.attach()
        try:
            loss_init = mean_loss(loss_fn, sequences, config.batch_size)  # the init's weights, exactly
            train_start = time.perf_counter()
            with torch.enable_grad():
                for step, batch in enumerate(batch_order(len(sequences), config.batch_size, config.steps, config.seed)):
                    rate = learning_rate(step, config.steps, config.lr, config.schedule)
                    for group in optimizer.param_groups:
                        group["lr"] = rate
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(sequences[batch])
                    loss.backward()
                    optimizer.step()
                    tokens += sequences[batch].numel()
                    curve.append([step + 1, loss.item(), rate])
                    if (step + 1) % max(1, config.steps // 10) == 0 or step + 1 == config.steps:
                        log.info("qat: step %d/%d, loss %.4f (init %.4f), lr %.3g, %.1f s/step", step + 1, config.steps,
                                 curve[-1][1], loss_init, rate, (time.perf_counter() - train_start) / (step + 1))
        finally:
            for q in trained.values():
                q.detach()
            for parameter in weights:
                parameter.requires_grad_(False)
        final = {}
        for name, q in trained.items():
            drift = q.drift()
            final[name] = q.final_format()
            final[name].info["qat"] = {"codes_changed": float((final[name].codes != formats[name].codes).float().mean()),
                                       "init": config.init, **drift}
        loss_final = mean_loss(loss_fn, sequences, config.batch_size)  # the committed grid weights
        record = {"method": self.name, "init": config.init, "steps": config.steps, "tokens_seen": tokens,
                  "seconds": time.perf_counter() - start, "curve_columns": ["step", "loss", "lr"], "curve": curve,
                  "calib_loss_init": loss_init, "calib_loss_final": loss_final}
        return final, record


@torch.no_grad()
def mean_loss(loss_fn: Callable[[torch.Tensor], torch.Tensor], sequences: torch.Tensor, batch_size: int) -> float:
    """The mean next-token loss over every sequence, in batches (each batch weighted by its size)."""
    total = sum(loss_fn(batch).item() * len(batch) for batch in sequences.split(batch_size))
    return total / len(sequences)
