"""Architecture adapters: where the blocks are, their linears by role, the order GPTQ quantizes
them in, and the scaling groups AWQ needs (reference/methods.md §3.2, §4.3).

Declarative tables per family, like GPTQModel's `module_tree`, for the families whose scaling
groups AWQ and SmoothQuant need (llama-like, OPT); no per-model driver scripts. Any other causal
LM of transformers gets an adapter derived from its own structure (`derive_architecture`, through
`resolve_architecture`): its decoder layers from `_no_split_modules`, its linears and which of
them share an input from one forward of block 0 on a few tokens. It has no scaling groups, so
AWQ and SmoothQuant refuse it (`check_method_fits`) until a table is added.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from quantlab.methods.block import ScalingGroup


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
    # Linears that read the very same input tensor besides those of a scaling group (which share
    # one by definition): one Hessian / observer serves them (methods/hessian.py).
    input_groups: tuple[tuple[str, ...], ...] = ()
    # Applied to lm_head's logits where the model's own head does more (Gemma 2's soft-capping).
    finish_logits: Callable[[torch.Tensor], torch.Tensor] | None = None
    derived: bool = False  # built from the model's structure (derive_architecture), not a table

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
PROBE_TOKENS = 8  # the derived adapter's forward of block 0


def supported_model_types() -> list[str]:
    """The model types a table claims (any other causal LM gets a derived adapter)."""
    return sorted(t for arch in ARCHITECTURES for t in arch.model_types)


def architecture_for(model_type: str) -> Architecture:
    """The table that claims `model_type`; `resolve_architecture` also derives the others."""
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise UnsupportedArchitecture(
        f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}. "
        "Add a table to experiments/models/adapters.py to support a new family."
    )


def resolve_architecture(model: nn.Module) -> Architecture:
    """The family's table when one claims the model's `model_type`, else one derived from the model."""
    model_type = model.config.model_type
    if model_type in supported_model_types():
        return architecture_for(model_type)
    return derive_architecture(model)


def check_model_type(model_type: str) -> None:
    """Before loading: refuse a model_type that neither a table nor the derived adapter can take
    (the derived one needs a causal LM class in transformers)."""
    if model_type in supported_model_types():
        return
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} has no causal LM class in transformers {transformers.__version__}; "
            f"tables: {', '.join(supported_model_types())}, and any causal LM transformers knows (qwen2, "
            "phi3, gemma2, ...) is adapted from its own structure"
        )


def check_structure(config: Any) -> None:
    """Before loading a model built from `config` (a random one): where no table claims its type,
    its layout must be one `derive_architecture` reads (checked on the meta device: no weights)."""
    if config.model_type in supported_model_types():
        return
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    _, blocks = _decoder_layers(model)
    _block_linears(model, blocks[0])


def check_method_fits(arch: Architecture, method: Any) -> None:
    """Refuse a method that folds scales into scaling groups (AWQ, SmoothQuant) on an
    architecture that has none (a derived one), naming the way out."""
    if not getattr(method, "folds_scales", False) or arch.scaling_groups:
        return
    from quantlab.methods import REGISTRY

    others = sorted(name for name, cls in REGISTRY.items() if not cls.folds_scales and cls.quantizes_weights)
    raise UnsupportedArchitecture(
        f"method {method.name!r} folds per-channel scales into an architecture table's scaling groups, and "
        f"model_type {arch.family!r} has no table: its adapter is derived from the model's structure, which "
        "names no scaling groups. Add a table for it to ARCHITECTURES in experiments/models/adapters.py "
        "(LLAMA_LIKE is the example: the norm or linear before each set of linears that share an input), or "
        f"choose a method that folds no scales: {', '.join(others)}"
    )


def derive_architecture(model: nn.Module) -> Architecture:
    """An adapter from the model's own structure, for a family no table claims.

    Blocks: the one ModuleList whose members are all of a class in `model._no_split_modules`.
    Linears: every nn.Linear of block 0, in the order one forward on `PROBE_TOKENS` tokens calls
    them (not their registration order: Phi-3 registers o_proj before qkv_proj); the same forward
    says which linears read the very same input tensor (`input_groups`: one Hessian serves them)
    and which modules outside the blocks run before block 0 (`pre_block_modules`: embeddings,
    rotary). Sequential groups: one per distinct input, in execution order (attention inputs,
    output projection, MLP inputs, down projection for a llama-like block), quantized true-
    sequentially by default as the GPTQ reference does for LLaMA. No scaling groups (AWQ and
    SmoothQuant refuse: `check_method_fits`) and no residual checkpoint (output passes run the
    whole block)."""
    model_type = model.config.model_type
    blocks_path, blocks = _decoder_layers(model)
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if not isinstance(backbone, nn.Module) or not blocks_path.startswith(prefix + "."):
        raise UnsupportedArchitecture(
            f"model_type {model_type!r}: its base model (base_model_prefix={prefix!r}) does not hold the "
            f"decoder layers at {blocks_path}; add a table to experiments/models/adapters.py"
        )
    order, shared, pre_block = _probe_block0(model, backbone, blocks_path, blocks)
    return Architecture(
        family=model_type, model_types=(model_type,), backbone=prefix, blocks=blocks_path,
        pre_block_modules=pre_block, linears=tuple(order), sequential_groups=shared,
        true_sequential_default=True, scaling_groups=(),
        input_groups=tuple(group for group in shared if len(group) > 1),
        finish_logits=_head_transform(model.config), derived=True,
    )


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the decoder layers: the list of `_no_split_modules` instances."""
    model_type = model.config.model_type
    classes = set(getattr(model, "_no_split_modules", None) or ())
    found = [
        (path, module) for path, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) and all(type(m).__name__ in classes for m in module)
    ]
    if len(found) != 1:
        what = ", ".join(path for path, _ in found) if found else "none"
        raise UnsupportedArchitecture(
            f"model_type {model_type!r}: the decoder layers are the one ModuleList of {sorted(classes) or 'the'} "
            f"_no_split_modules classes of {type(model).__name__}, found {what}; add a table to "
            "experiments/models/adapters.py"
        )
    return found[0]


def _block_linears(model: nn.Module, block: nn.Module) -> dict[str, nn.Linear]:
    linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise UnsupportedArchitecture(
            f"model_type {model.config.model_type!r}: {type(block).__name__} holds no nn.Linear (GPT-2's Conv1D "
            "is not one); add a table and layer support to experiments/models/adapters.py"
        )
    return linears


class _ProbeDone(Exception):
    pass


@torch.no_grad()
def _probe_block0(
    model: nn.Module, backbone: nn.Module, blocks_path: str, blocks: nn.ModuleList
) -> tuple[list[str], tuple[tuple[str, ...], ...], tuple[str, ...]]:
    """One forward of block 0: (its linears in call order, the linears grouped by the very tensor
    they read, in order, the top-most modules outside the blocks that finished before block 0)."""
    model_type = model.config.model_type
    linears = _block_linears(model, blocks[0])
    calls: list[tuple[str, torch.Tensor]] = []
    finished: list[str] = []
    started = [False]
    handles = [blocks[0].register_forward_pre_hook(lambda _m, _a: started.__setitem__(0, True))]

    def block_done(_module, _args, _output):
        raise _ProbeDone

    handles.append(blocks[0].register_forward_hook(block_done))
    for name, linear in linears.items():
        handles.append(linear.register_forward_pre_hook(lambda _m, args, name=name: calls.append((name, args[0]))))
    for name, module in model.named_modules():
        if name and name != blocks_path and not name.startswith(blocks_path + "."):
            handles.append(module.register_forward_hook(
                lambda _m, _a, _o, name=name: None if started[0] else finished.append(name)))
    ids = torch.arange(PROBE_TOKENS)[None] % model.config.vocab_size
    try:
        backbone(input_ids=ids.to(model.get_input_embeddings().weight.device), use_cache=False)
    except _ProbeDone:
        pass
    finally:
        for handle in handles:
            handle.remove()
    order = list(dict.fromkeys(name for name, _ in calls))
    if sorted(order) != sorted(linears) or len(calls) != len(linears):
        raise UnsupportedArchitecture(
            f"model_type {model_type!r}: a forward of block 0 called its linears {[n for n, _ in calls]}, not each of "
            f"{sorted(linears)} once (experts, a shared linear?); add a table to experiments/models/adapters.py"
        )
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, tensor in calls:
        same = next((names for seen, names in groups if seen is tensor), None)
        if same is None:
            groups.append((tensor, [name]))
        else:
            same.append(name)
    pre_block = [n for n in finished if not any(n.startswith(other + ".") for other in finished)]
    return order, tuple(tuple(names) for _, names in groups), tuple(pre_block)


def _soft_cap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(logits / cap) * cap


def _scaled(logits: torch.Tensor, scale: float) -> torch.Tensor:
    return logits * scale


def _head_transform(config: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the model's causal-LM head does after lm_head, read from its config: Gemma 2's
    soft-capping, Cohere's `logit_scale`, Granite's `logits_scaling` (a divisor)."""
    if getattr(config, "final_logit_softcapping", None):
        return partial(_soft_cap, cap=float(config.final_logit_softcapping))
    if getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return partial(_scaled, scale=float(config.logit_scale))
    if getattr(config, "logits_scaling", None) not in (None, 1, 1.0):
        return partial(_scaled, scale=1.0 / float(config.logits_scaling))
    return None
