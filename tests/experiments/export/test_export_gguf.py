"""GGUF export: our codes written as ggml blocks are gguf-py's own bytes (gguf-py as the oracle),
q / k rows follow llama.cpp's order, and a tiny model reloads through transformers' GGUF loader."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants

from quantlab.experiments.export import ExportRefused, export_model
from quantlab.experiments.export.gguf import gguf_blocks, rotary_rows
from quantlab.experiments.export.layout import Layout, refusal
from quantlab.experiments.export.readers import decode_gguf_blocks
from quantlab.methods.gguf import BLOCK_TYPES, quantize_weight
from tests.experiments.export.conftest import act_order, fake_quant_copy, logits, rtn, save_tiny
from tests.methods.test_gguf import weights


@pytest.mark.parametrize("key", sorted(BLOCK_TYPES))
def test_llama_cpp_rounding_exports_to_gguf_pys_bytes(key):
    """The baselines' UniformWeights, written as blocks, are what gguf-py's quantizer writes."""
    w = weights(11)
    qtype, blocks = gguf_blocks(quantize_weight(w, BLOCK_TYPES[key]))
    expected = quants.quantize(w.numpy(), getattr(GGMLQuantizationType, BLOCK_TYPES[key].name))
    assert qtype.name == BLOCK_TYPES[key].name
    type_size = quants.GGML_QUANT_SIZES[qtype][1]
    ours, theirs = blocks.reshape(-1, type_size), expected.reshape(-1, type_size)
    # Blocks whose fp16 scale is 0 carry no information in their codes (methods/gguf.py stores 0s
    # there): the row of weights(), whose range is below fp16's smallest step. Their values agree.
    empty = decode_gguf_blocks(theirs, qtype.name)["d"] == 0
    same = (ours == theirs).all(axis=1)
    assert same[~empty].all() and (not BLOCK_TYPES[key].symmetric or same.all())
    assert np.array_equal(quants.dequantize(blocks, qtype), quants.dequantize(expected, qtype))


@pytest.mark.parametrize("name", ["Q4_1", "Q5_1"])
def test_a_float_zero_rtn_of_a_gguf_grid_gives_back_its_bytes(name):
    """Weights that are a Q4_1 file's dequantized values, re-quantized by RTN with a float zero at
    g32, export to the file's own bytes in every block whose codes span the full range."""
    qtype = getattr(GGMLQuantizationType, name)
    original = quants.quantize(weights(5).numpy(), qtype)
    w = torch.from_numpy(quants.dequantize(original, qtype))
    fmt = rtn(4 if name == "Q4_1" else 5, 32, float_zero=True)("layer", w)
    _, ours = gguf_blocks(fmt)
    type_size = quants.GGML_QUANT_SIZES[qtype][1]
    mine = decode_gguf_blocks(ours.reshape(-1, type_size), name)
    theirs = decode_gguf_blocks(original.reshape(-1, type_size), name)
    full = (theirs["q"].min(axis=1) == 0) & (theirs["q"].max(axis=1) == 2 ** fmt.bits - 1)
    full &= theirs["d"] != 0  # a zero fp16 scale leaves the codes meaningless (the tiny row of weights())
    assert full.sum() > 0.9 * full.size
    for field in ("q", "d", "m"):
        a, b = mine[field][full], theirs[field][full]
        assert np.array_equal(a.view(np.uint16) if a.dtype == np.float16 else a, b.view(np.uint16) if b.dtype == np.float16 else b), field
    ours_values = quants.dequantize(ours, qtype)
    assert np.array_equal(ours_values.reshape(-1, 32)[full], w.numpy().reshape(-1, 32)[full])


def test_groups_of_64_repeat_their_scale_and_minimum():
    fmt = rtn(4, 64)("layer", torch.randn(4, 128))
    _, blocks = gguf_blocks(fmt)
    fields = decode_gguf_blocks(blocks.reshape(-1, 20), "Q4_1")
    d = fields["d"].reshape(4, 4)
    assert np.array_equal(d[:, 0], d[:, 1]) and np.array_equal(d[:, 2], d[:, 3])
    stored = fmt.rounded_to_storage()
    values = quants.dequantize(blocks, GGMLQuantizationType.Q4_1)
    assert np.allclose(values, stored.dequantize().numpy(), rtol=0, atol=2e-3 * float(stored.dequantize().abs().max()))


def test_rotary_rows_are_llama_cpps_permute_and_transformers_undoes_it():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(12 * 3, dtype=np.float32).reshape(12, 3)
    n_head = 3
    permuted = w.reshape(n_head, 2, w.shape[0] // n_head // 2, 3).swapaxes(1, 2).reshape(w.shape)  # llama.cpp
    assert np.array_equal(w[rotary_rows(12, n_head).numpy()], permuted)
    processor = LlamaTensorProcessor(config={"num_attention_heads": n_head, "num_key_value_heads": n_head})
    assert np.array_equal(processor._reverse_permute_weights(permuted, n_head, n_head), w)


@pytest.mark.parametrize(("layout", "needle"), [
    (Layout("uniform", 4, 32, "none", "explicit"), "static_groups=true"),
    (Layout("uniform", 4, 16, "int"), "group_size=16"),
    (Layout("uniform", 3, 32, "int"), "bits=3"),
    (Layout("uniform", 8, 32, "int"), "Q8_0"),
    (Layout("codebook"), "codebook"),
    (Layout("uniform", 3, -1, "int", outliers=True), "OWQ"),
    (Layout("uniform", 2, 128, "int", mixed_widths=True), "SliM-LLM"),
])
def test_what_gguf_cannot_hold_is_refused_with_the_way_out(layout, needle):
    assert needle in refusal("gguf", layout)


# About 25 s each (gguf-py reads the 49,152-token vocabulary field by field): two cases here; the
# other types and group sizes are checked block by block above.
@pytest.mark.parametrize("case", ["q4_1-rtn-float-zero", "q4_0-baseline"])
def test_tiny_model_reloads_through_transformers_gguf(case, tiny_llama, tmp_path, token_ids):
    from transformers import AutoModelForCausalLM

    quantize = {
        "q4_1-rtn-float-zero": rtn(4, 32, float_zero=True),
        "q4_0-baseline": lambda name, w: quantize_weight(w, BLOCK_TYPES["q4_0"]),
    }[case]
    formats = save_tiny(tiny_llama, tmp_path / "saved", quantize)
    summary = export_model(tmp_path / "saved", "gguf", tmp_path / "gguf")
    assert sum(summary["gguf_types"].values()) == len(formats)
    reader = GGUFReader(tmp_path / "gguf" / "model.gguf")
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf", dtype=torch.float32)
    fake = fake_quant_copy(tiny_llama, formats)
    for name in formats:
        theirs, ours = reloaded.get_submodule(name).weight, fake.get_submodule(name).weight
        if case == "q4_0-baseline":  # ggml's own grid: identical
            assert torch.equal(theirs, ours), name
        else:  # fp16 d and m
            assert (theirs - ours).abs().max() <= 2e-3 * ours.abs().max(), name
    a, b = logits(reloaded, token_ids), logits(fake, token_ids)
    assert (a - b).abs().max() <= 1e-2 * b.abs().max()


def test_act_order_is_refused_before_anything_is_written(tiny_llama, tmp_path):
    save_tiny(tiny_llama, tmp_path / "saved", act_order(4, 32, sym=True))
    with pytest.raises(ExportRefused, match="static_groups=true"):
        export_model(tmp_path / "saved", "gguf", tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists() and not (tmp_path / "gguf.partial").exists()
