"""compressed-tensors pack-quantized: each layer as compressed-tensors itself decompresses it, and a
tiny model reloaded through transformers' compressed-tensors path computes the same logits."""

import json

import pytest
import torch

from quantlab.experiments.export import ExportRefused, export_model
from quantlab.experiments.export.compressed_tensors import layer_tensors, quantization_config
from quantlab.experiments.export.readers import read_compressed_tensors
from tests.experiments.export.conftest import act_order, fake_quant_copy, logits, rtn, save_tiny

ct = pytest.importorskip("compressed_tensors")

CASES = {  # name: (quantizer, width): int4 / int8, symmetric / asymmetric, group / channel / short tail
    "w4-asym-g32": (rtn(4, 32), 160),
    "w4-sym-g32": (rtn(4, 32, sym=True), 160),
    "w8-asym-g32": (rtn(8, 32), 160),
    "w8-sym-channel": (rtn(8, -1, sym=True), 160),
    "w4-asym-channel": (rtn(4, -1), 96),
    "w4-asym-g64-short-tail": (rtn(4, 64), 160),  # 160 = 2.5 x 64: written at g32
    "w4-sym-g128-short-tail": (rtn(4, 128, sym=True), 576),  # SmolLM2's 576 = 4.5 x 128: written at g64
}


def decompress(tensors: dict, args: dict) -> torch.Tensor:
    """compressed-tensors' own decompression of one layer, its scales in an fp32 model's parameter
    (the dequantized weight comes out in the scale's dtype)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    tensors = {**tensors, "weight_scale": tensors["weight_scale"].float()}
    return PackedQuantizationCompressor.decompress(tensors, scheme)["weight"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_compressed_tensors_decompresses_our_weights(case):
    quantize, width = CASES[case]
    weight = torch.randn(48, width, generator=torch.Generator().manual_seed(1))
    fmt = quantize("layer", weight)
    tensors = layer_tensors(fmt)
    config = quantization_config({"layer": fmt})
    (group,) = config["config_groups"].values()
    expected = fmt.rounded_to_storage().dequantize()  # fp16 scales, exact integer zero-points
    assert torch.equal(decompress(tensors, group["weights"]).float(), expected)
    assert (tensors["weight_packed"].dtype, tensors["weight_scale"].dtype) == (torch.int32, torch.float16)
    ct.QuantizationConfig.model_validate(config)  # a config compressed-tensors parses


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_tensors_are_what_compressed_tensors_writes(case):
    """compressed-tensors' own compressor, given the dense weight, its scales and zero-points,
    writes the same tensors bit for bit."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    quantize, width = CASES[case]
    fmt = quantize("layer", torch.randn(48, width, generator=torch.Generator().manual_seed(2)))
    tensors = layer_tensors(fmt)
    (group,) = quantization_config({"layer": fmt})["config_groups"].values()
    args = group["weights"]
    state = {"weight": fmt.rounded_to_storage().dequantize(), "weight_scale": tensors["weight_scale"].float()}
    if not args["symmetric"]:
        n = tensors["weight_scale"].shape[1]  # regrouped: each written group takes its original group's zero
        zeros = fmt.zeros if n == fmt.n_groups else fmt.zeros[:, torch.arange(0, width, width // n) // fmt.group_size]
        state["weight_zero_point"] = (zeros - 2 ** (fmt.bits - 1)).to(torch.int8)
    theirs = PackedQuantizationCompressor.compress(state, QuantizationScheme(targets=["Linear"], weights=args))
    for key in ("weight_packed", "weight_zero_point"):
        if key in tensors:
            assert torch.equal(theirs[key], tensors[key]), key
    assert torch.equal(theirs["weight_shape"], tensors["weight_shape"])


def test_short_last_groups_repeat_their_scales():
    fmt = rtn(4, 128, sym=True)("layer", torch.randn(8, 576))
    tensors = layer_tensors(fmt, quantization_config_group_size({"layer": fmt}))
    (group,) = quantization_config({"layer": fmt})["config_groups"].values()
    assert group["weights"]["group_size"] == 64 and tensors["weight_scale"].shape == (8, 9)
    assert torch.equal(tensors["weight_scale"][:, 0:8:2], tensors["weight_scale"][:, 1:8:2])


def quantization_config_group_size(formats):
    from quantlab.experiments.export.compressed_tensors import group_sizes

    (size,) = set(group_sizes(formats).values())
    return size


def test_one_group_size_serves_the_model_when_it_can():
    """SmolLM2 at g128: 576-wide layers need g64, 1536-wide ones allow g128; one scheme at g64."""
    from quantlab.experiments.export.compressed_tensors import group_sizes

    formats = {"a": rtn(4, 128)("a", torch.randn(8, 576)), "b": rtn(4, 128)("b", torch.randn(8, 1536))}
    assert group_sizes(formats) == {"a": 64, "b": 64}
    assert len(quantization_config(formats)["config_groups"]) == 1


def test_act_order_is_written_with_g_idx():
    fmt = act_order(4, 32)("layer", torch.randn(16, 96))
    tensors = layer_tensors(fmt)
    (group,) = quantization_config({"layer": fmt})["config_groups"].values()
    assert group["weights"]["actorder"] == "group" and torch.equal(tensors["weight_g_idx"], fmt.g_idx)
    assert torch.equal(read_layer(tensors, group["weights"]), fmt.rounded_to_storage().dequantize())


def read_layer(tensors, args):
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as folder:
        save_file({f"layer.{k}": v for k, v in tensors.items()}, f"{folder}/model.safetensors")
        config = {"quantization_config": {"config_groups": {"g": {"targets": ["layer"], "weights": args}}}}
        Path(folder, "config.json").write_text(json.dumps(config))
        return read_compressed_tensors(Path(folder))["layer"]


@pytest.mark.parametrize("case", ["w4-asym-g64", "w8-sym-g32", "w4-sym-g64", "w4-act-order"])
def test_tiny_model_reloads_through_transformers(case, tiny_llama, tmp_path, token_ids):
    """The fp32 tiny model keeps fp32 scales: transformers' weights are the fake-quant ones bit for bit.
    Asymmetric checkpoints load through `CompressedTensorsConfig(dequantize=True)`: the default
    path builds the model on the meta device, where compressed-tensors 0.20.1's compressor does not
    pack the zero-point parameter, so the checkpoint's packed zero-points do not fit it."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    quantize = {"w4-asym-g64": rtn(4, 64), "w8-sym-g32": rtn(8, 32, sym=True), "w4-sym-g64": rtn(4, 64, sym=True),
                "w4-act-order": act_order(4, 32)}[case]
    formats = save_tiny(tiny_llama, tmp_path / "saved", quantize)
    summary = export_model(tmp_path / "saved", "compressed-tensors", tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert summary["n_linears"] == len(formats) == sum(len(g["targets"]) for g in config["config_groups"].values())
    assert summary["scale_dtype"] == "float32"
    fake = fake_quant_copy(tiny_llama, formats)
    reader = read_compressed_tensors(tmp_path / "ct")
    for name in formats:
        assert torch.equal(reader[name], fake.get_submodule(name).weight), name
    if case == "w4-act-order":  # compressed-tensors 0.20 refuses actorder="group" (the module says so)
        assert any("actorder" in note for note in summary["notes"])
        return
    options = {} if "-sym-" in case else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32, **options)
    theirs, ours = logits(reloaded, token_ids), logits(fake, token_ids)
    for name in formats:
        assert torch.equal(reloaded.get_submodule(name).weight, fake.get_submodule(name).weight), name
    assert torch.allclose(theirs, ours, rtol=0, atol=1e-5 * ours.abs().max().item())


def test_float_zero_points_are_refused(tiny_llama, tmp_path):
    save_tiny(tiny_llama, tmp_path / "saved", rtn(4, 32, float_zero=True))
    with pytest.raises(ExportRefused, match="float zero-point.*export gguf"):
        export_model(tmp_path / "saved", "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_three_bits_are_refused(tiny_llama, tmp_path):
    save_tiny(tiny_llama, tmp_path / "saved", rtn(3, 32))
    with pytest.raises(ExportRefused, match="bits=3.*export gptq"):
        export_model(tmp_path / "saved", "compressed-tensors", tmp_path / "ct")
