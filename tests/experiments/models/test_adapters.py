import pytest

from quantlab.experiments.models.adapters import LLAMA_LIKE, OPT, UnsupportedArchitecture, architecture_for


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitecture, match=r"'gpt2' is not supported; supported: .*llama.*opt"):
        architecture_for("gpt2")


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_llama_family(model_type):
    assert architecture_for(model_type) is LLAMA_LIKE


@pytest.mark.parametrize("arch", [LLAMA_LIKE, OPT])
def test_tables_are_consistent(arch):
    grouped = [name for group in arch.sequential_groups for name in group]
    assert sorted(grouped) == sorted(arch.linears), "every linear is in exactly one sequential group"
    for group in arch.scaling_groups:
        assert set(group.linears) <= set(arch.linears)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_opt"])
def test_tables_match_real_modules(fixture, request):
    loaded = request.getfixturevalue(fixture)
    blocks = loaded.architecture.block_list(loaded.model)
    linears = loaded.architecture.block_linears(blocks[0])
    assert len(linears) == len(loaded.architecture.linears)
    for group in loaded.architecture.scaling_groups:
        blocks[0].get_submodule(group.prev_op)
        blocks[0].get_submodule(group.inspect)


def test_smollm2_is_llama_like(smollm2):
    assert smollm2.architecture is LLAMA_LIKE
    assert smollm2.model.config.hidden_size == 576
    assert smollm2.fingerprint.startswith("gguf:SmolLM2-135M-Instruct.Q4_1.gguf:sha256=")
