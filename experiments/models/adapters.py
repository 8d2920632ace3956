"""Declarative architecture tables: where the blocks are, their linears by role, the order GPTQ
quantizes them in, and the scaling groups AWQ needs (reference/methods.md §3.2, §4.3).

One table per family, like GPTQModel's `module_tree`; no per-model driver scripts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from methods.block import ScalingGroup


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class Architecture:
    family: str
    model_types: tuple[str, ...]
    backbone: str  # attribute path of the base model (returns hidden states)
    blocks: str  # attribute path of the ModuleList of decoder blocks
    pre_block_modules: tuple[str, ...]  # modules the catcher forward needs before block 0
    linears: tuple[str, ...]  # every linear of a block, in execution order
    sequential_groups: tuple[tuple[str, ...], ...]
    true_sequential_default: bool
    scaling_groups: tuple[ScalingGroup, ...]
    # The module whose input is the mid-block residual stream r = h + attention(h), and the rest of
    # the block as a function of r: a last calibration pass can keep r instead of h, and the output
    # pass then skips the attention (None where the block is not of that shape).
    residual_checkpoint: str | None = None
    finish_block: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    finish_supported: Callable[[nn.Module], bool] = lambda block: True

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)  # type: ignore[return-value]

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {name: block.get_submodule(name) for name in self.linears}  # type: ignore[misc]


def _finish_pre_norm_llama(block: nn.Module, residual: torch.Tensor) -> torch.Tensor:
    return residual + block.mlp(block.post_attention_layernorm(residual))


def _finish_pre_norm_opt(block: nn.Module, residual: torch.Tensor) -> torch.Tensor:
    flat = residual.reshape(-1, residual.shape[-1])
    out = block.fc2(block.activation_fn(block.fc1(block.final_layer_norm(flat))))
    return (flat + out).view(residual.shape)


LLAMA_LIKE = Architecture(
    family="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3"),
    backbone="model",
    blocks="model.layers",
    pre_block_modules=("model.embed_tokens", "model.rotary_emb"),
    linears=(
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ),
    # The GPTQ reference's true-sequential order (gptq:llama.py).
    sequential_groups=(
        ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"),
        ("self_attn.o_proj",),
        ("mlp.up_proj", "mlp.gate_proj"),
        ("mlp.down_proj",),
    ),
    true_sequential_default=True,
    scaling_groups=(
        ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
        ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScalingGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
    residual_checkpoint="post_attention_layernorm",
    finish_block=_finish_pre_norm_llama,
)

OPT = Architecture(
    family="opt",
    model_types=("opt",),
    backbone="model",
    blocks="model.decoder.layers",
    pre_block_modules=("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"),
    linears=(
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2",
    ),
    sequential_groups=(
        ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    # gptq:opt.py collects every linear's Hessian from one forward pass.
    true_sequential_default=False,
    scaling_groups=(
        ScalingGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ScalingGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
        ScalingGroup("final_layer_norm", ("fc1",), "fc1"),
        # awq:auto_scale.py scales fc1 -> fc2 too: exact because OPT's activation (ReLU) is
        # positively homogeneous, relu(x / s) = relu(x) / s for s > 0.
        ScalingGroup("fc1", ("fc2",), "fc2"),
    ),
    residual_checkpoint="final_layer_norm",
    finish_block=_finish_pre_norm_opt,
    # OPT-350m normalizes after the residual adds: its second half is not a function of r alone.
    finish_supported=lambda block: bool(block.do_layer_norm_before),
)

ARCHITECTURES = (LLAMA_LIKE, OPT)


def supported_model_types() -> list[str]:
    return sorted(t for arch in ARCHITECTURES for t in arch.model_types)


def architecture_for(model_type: str) -> Architecture:
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise UnsupportedArchitecture(
        f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}. "
        "Add a table to experiments/models/adapters.py to support a new family."
    )
