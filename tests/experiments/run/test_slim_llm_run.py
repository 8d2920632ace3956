"""SliM-LLM end to end on the tiny random llama: the run searches, finishes, takes avg_bits from the
format and writes its allocation (method.save_allocation); an allocation file reaches the method
(method.allocation; the method-level effect is in tests/methods/test_slim_llm.py)."""

import json

import pytest
import torch

from quantlab.experiments.run.allocation_files import (
    attach,
    read_allocation,
    table_from_layers,
    write_allocation,
)
from quantlab.experiments.run.cli import run_from_config
from quantlab.kernels import format_from_packed
from quantlab.methods.slim_llm import SliMLLM, SliMLLMConfig
from tests.conftest import compose_config
from tests.experiments.run.test_cli import TINY, isolated_cache  # noqa: F401  (fixture)

SLIM = [arg for arg in TINY if not arg.startswith(("method=", "bits=", "group_size=", "eval.ppl.max_windows="))]
SLIM += ["method=slim_llm", "bits=3", "group_size=16", "eval.ppl.max_windows=4"]  # 4 to 10 groups: a real search


@pytest.fixture
def one_thread():
    """Tiny matrices: on the shared CPU, extra OpenMP threads turn each small op into milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_llama_run_searches_and_saves_its_allocation(tmp_path, isolated_cache, one_thread):  # noqa: F811
    saved = tmp_path / "alloc" / "tiny-llama.pt"
    record = run_from_config(compose_config(*SLIM, f"method.save_allocation={saved}"), tmp_path / "a", progress=False)
    on_disk = json.loads((tmp_path / "a" / "result.json").read_text())
    assert on_disk["status"] == "ok"
    layers = record["layers"]
    assert len(layers) == 14
    for layer in layers:
        widths = layer["info"]["allocation"]
        assert sum(widths) == 3 * len(widths) and layer["info"]["allocation_source"] == "search"
        candidates = len(widths) // 2 - 1  # k = 1 .. G_n // 2 - 1; a single one is taken unscored
        assert layer["info"]["kl_candidates"] == candidates
        assert len(layer["info"]["kl_curve"]) == (candidates if candidates >= 2 else 0)
    numel = sum(layer["shape"][0] * layer["shape"][1] for layer in layers)
    assert record["avg_bits"] == pytest.approx(sum(layer["storage_bits"] for layer in layers) / numel)
    assert record["avg_bits"] > 3  # codes average 3 bits; plus the scales, zeros and width tables
    table = read_allocation(saved)  # the reference's layout: {block: {linear: widths}}
    assert sorted(table) == [0, 1] and len(table[1]) == 7
    assert table[1]["mlp.down_proj"] == next(
        layer["info"]["allocation"] for layer in layers if layer["name"].endswith("layers.1.mlp.down_proj")
    )


def test_an_allocation_file_reaches_the_method(tmp_path):
    path = tmp_path / "block_precision_128_2bit" / "model.pt"
    table = {0: {"self_attn.q_proj": [1, 2, 3]}, 3: {"mlp.down_proj": [2, 2]}}
    write_allocation(path, table)
    assert torch.load(path, weights_only=True) == table  # a plain dict, as the reference saves it
    method = SliMLLM(SliMLLMConfig(bits=2, allocation=str(path)))
    attach(method)
    assert method.allocation_table == table
    layers = [{"info": {"allocation": [1, 2, 3], "block_index": 0, "linear": "self_attn.q_proj"}}, {"info": {}}]
    assert table_from_layers(layers) == {0: {"self_attn.q_proj": [1, 2, 3]}}


def test_a_missing_allocation_file_fails_before_the_model_loads(tmp_path):
    from quantlab.methods.base import ConfigError

    with pytest.raises(ConfigError, match="no such file"):
        run_from_config(compose_config(*SLIM, f"method.allocation={tmp_path / 'none.pt'}"), tmp_path / "x", progress=False)


def test_packed_slim_weights_round_trip():
    from quantlab.methods.slim_llm import slim_quantize
    from tests.methods.test_slim_llm import problem

    w, H, _ = problem(rows=8, cols=64)
    qweight, _ = slim_quantize(w, H, SliMLLMConfig(bits=2, group_size=8), 2)
    back = format_from_packed(qweight.pack(), qweight.meta())
    assert torch.equal(back.dequantize(), qweight.rounded_to_storage().dequantize())


def test_the_quantization_cache_keys_the_allocation_by_content(tmp_path, tiny_llama, data_dir):
    """Rewriting an allocation file in place must not reuse weights quantized with the old one."""
    from types import SimpleNamespace

    from quantlab.experiments.run.cli import load_group_option
    from quantlab.experiments.run.schema import validate
    from quantlab.experiments.store.artifacts import QuantizedStore

    path = tmp_path / "alloc.pt"
    run = validate(compose_config(*SLIM, f"method.allocation={path}"), load_group_option)
    method = SliMLLM(run.method)
    store = QuantizedStore(run, tiny_llama, method, SimpleNamespace(record=None), None)
    keys = []
    for table in ({0: {"self_attn.q_proj": [2, 3, 4]}}, {0: {"self_attn.q_proj": [3, 3, 3]}}):
        write_allocation(path, table)
        keys.append(store.key())
    assert keys[0]["allocation_sha256"] != keys[1]["allocation_sha256"]
