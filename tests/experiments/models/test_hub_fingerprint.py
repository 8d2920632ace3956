"""A hub model's fingerprint names the commit it resolved to, not the branch ("main" moves)."""

import transformers

import quantlab.experiments.models.loading as loading
from quantlab.experiments.models.loading import ModelSpec, load_model

SHAPE = dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=1)


def test_hub_fingerprint_pins_the_resolved_commit(monkeypatch):
    def from_pretrained(where, **kwargs):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**SHAPE))
        model.config._commit_hash = "0123456789abcdef"
        return model

    monkeypatch.setattr(loading, "_load_tokenizer", lambda *args, **kwargs: object())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    loaded = load_model(ModelSpec(name="m", source="hub", path="org/model", device="cpu", dtype="float32"))
    assert loaded.fingerprint == "hub:org/model@0123456789abcdef"
