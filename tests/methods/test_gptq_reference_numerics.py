"""GPTQ end to end against IST-DASLab's per-block procedure, on the same inputs (issue 20).

The oracle is a literal transcription of `llama_sequential` (gptq:llama.py) with `add_batch`
(gptq:gptq.py) and the `fasterquant` transcription of test_gptq.py: the catcher, one sequence per
forward, a Hessian per linear with the running n / (n + 1) rescaling, the groups
[k, v, q] -> [o] -> [up, gate] -> [down] each after a fresh pass, the outputs by a full block
forward. Only change: the catcher keeps every keyword the block receives, because transformers 5
passes the rotary `position_embeddings` (the reference kept attention_mask and position_ids).

`method.reference_numerics=true` must equal the oracle to the bit: Hessians, codes, losses, over
several blocks (so propagation too). The fast path may differ in the last bits of its Hessians;
`Shortcuts` switches its shortcuts to the reference's way one at a time to find which one moves
the numbers. Run as a script for the README's tables on SmolLM2 (tens of CPU-minutes):

    PYTHONPATH=. python tests/methods/test_gptq_reference_numerics.py --nsamples 128 --seqlen 512 \
        --blocks 4 --seeds 1 2
"""

from __future__ import annotations

import argparse
import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from torch import nn

import quantlab.methods.gptq as gptq_module
from quantlab.experiments.run.pipeline import quantize_model
from quantlab.methods.gptq import GPTQ, GPTQConfig
from quantlab.methods.hessian import collect_hessians, input_representatives
from tests.methods.test_gptq import literal_fasterquant

REFERENCE_SEQUENTIAL = [
    ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
    ["self_attn.o_proj"],
    ["mlp.up_proj", "mlp.gate_proj"],
    ["mlp.down_proj"],
]


@dataclass
class LayerResult:
    hessian: torch.Tensor  # as handed to the solver
    codes: torch.Tensor  # [out, in], original column order
    loss: float  # the reference's sum of Losses


# ---------------------------------------------------------------------------------------------
# Oracle: gptq:llama.py llama_sequential and gptq:gptq.py add_batch, written out literally.


class LiteralGPTQ:
    def __init__(self, layer):
        self.layer = layer
        self.columns = layer.weight.data.shape[1]
        self.H = torch.zeros((self.columns, self.columns), device=layer.weight.device)
        self.nsamples = 0

    def add_batch(self, inp, out):
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        if len(inp.shape) == 3:
            inp = inp.reshape((-1, inp.shape[-1]))
        inp = inp.t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())


def literal_catcher(model, calib_ids):
    """llama_sequential's Catcher: block 0's inputs, one sample per forward."""
    use_cache = model.config.use_cache
    model.config.use_cache = False
    layers = model.model.layers
    inps = torch.zeros((calib_ids.shape[0], calib_ids.shape[1], model.config.hidden_size))
    cache = {"i": 0, "kwargs": None}

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, inp, **kwargs):
            inps[cache["i"]] = inp
            cache["i"] += 1
            cache["kwargs"] = kwargs
            raise ValueError

    layers[0] = Catcher(layers[0])
    try:
        for j in range(calib_ids.shape[0]):
            try:
                model(calib_ids[j : j + 1])
            except ValueError:
                pass
    finally:
        layers[0] = layers[0].module
        model.config.use_cache = use_cache
    return inps, cache["kwargs"]


def literal_llama_block(layer, inps, layer_kwargs, wbits, groupsize, percdamp=0.01):
    """One iteration of llama_sequential's block loop (true-sequential, asymmetric, no act-order);
    returns the block's outputs and, per linear, its Hessian, codes and loss."""
    results = {}
    outs = torch.zeros_like(inps)
    for names in REFERENCE_SEQUENTIAL:
        subset = {n: layer.get_submodule(n) for n in names}
        gptq = {name: LiteralGPTQ(subset[name]) for name in subset}

        def add_batch(name):
            def tmp(_, inp, out):
                gptq[name].add_batch(inp[0].data, out.data)  # noqa: B023 (the reference's closure)

            return tmp

        handles = [subset[name].register_forward_hook(add_batch(name)) for name in subset]
        for j in range(inps.shape[0]):
            outs[j] = layer(inps[j].unsqueeze(0), **layer_kwargs)[0]
        for h in handles:
            h.remove()
        for name in subset:
            hessian = gptq[name].H.clone()
            codes = torch.zeros_like(subset[name].weight.data)
            Q, loss = literal_fasterquant(
                subset[name].weight.data, gptq[name].H, wbits, False, groupsize, percdamp=percdamp, codes_out=codes
            )
            subset[name].weight.data = Q.reshape(subset[name].weight.shape).to(subset[name].weight.data.dtype)
            results[name] = LayerResult(hessian, codes, loss)
    for j in range(inps.shape[0]):
        outs[j] = layer(inps[j].unsqueeze(0), **layer_kwargs)[0]
    return outs, results


def literal_llama_sequential(model, calib_ids, n_blocks, wbits=3, groupsize=128):
    """The first `n_blocks` blocks, each quantized on its predecessors' quantized outputs; the
    model's own blocks are left alone (each is quantized as a copy)."""
    inps, layer_kwargs = literal_catcher(model, calib_ids)
    results = {}
    for i in range(n_blocks):
        layer = copy.deepcopy(model.model.layers[i])
        inps, block_results = literal_llama_block(layer, inps, layer_kwargs, wbits, groupsize)
        results.update({f"model.layers.{i}.{name}": r for name, r in block_results.items()})
    return results


# ---------------------------------------------------------------------------------------------
# quantlab: the real driver on copies of the first blocks, with switches for the attribution.


class RecordingGPTQ(GPTQ):
    """GPTQ that keeps the Hessian each linear was solved against."""

    def __init__(self, config):
        super().__init__(config)
        self.hessians: dict[str, torch.Tensor] = {}

    def solve(self, block, name, hessian):
        self.hessians[f"{block.name}.{name}"] = hessian.clone()
        return super().solve(block, name, hessian)


@dataclass(frozen=True)
class Shortcuts:
    """The fast path's departures from the reference's order of operations, each switchable alone
    (True: the reference's way). `reference_numerics=true` is all of them with `batch_size=1`."""

    one_sequence_per_forward: bool = False  # the driver's forward batch (and so the Hessian's)
    per_sequence_hessian: bool = False  # forwards stay batched; each sequence added alone
    reference_products: bool = False  # X^T X as one product in the reference's layout, not tiled
    per_linear_hessians: bool = False  # a pass and an accumulator per linear, not per input
    full_block_outputs: bool = False  # outputs by a full forward, not from the mid-block residual
    float64_hessian: bool = False  # not the reference: H summed in fp64, rounded once (a third order)


class _PerSequenceHooks:
    """A BlockView whose hooks see one sequence at a time, the forwards staying batched."""

    def __init__(self, view):
        self._view = view

    def __getattr__(self, name):
        return getattr(self._view, name)

    def run(self, hooks=None, stop_after=None, last_pass=False):
        split = {name: (lambda x, hook=hook: [hook(s) for s in x.split(1)]) for name, hook in (hooks or {}).items()}
        return self._view.run(split, stop_after, last_pass)


class _Float64Sum:
    def __init__(self):
        self.total, self.n_sequences = None, 0

    def add(self, x):
        flat = x.reshape(-1, x.shape[-1]).double()
        self.total = flat.T @ flat if self.total is None else self.total + flat.T @ flat
        self.n_sequences += x.shape[0]

    @property
    def hessian(self):
        return (2 / self.n_sequences * self.total).float()


def _collect_float64(block, names, last_pass):
    representative = input_representatives(block)
    order = list(block.linears)
    sources = sorted({representative[n] for n in names}, key=order.index)
    sums = {source: _Float64Sum() for source in sources}
    block.run({s: acc.add for s, acc in sums.items()}, stop_after=sources[-1], last_pass=last_pass)
    return {n: sums[representative[n]] for n in names}, {"forward_seconds": 0.0, "hessian_seconds": 0.0}


@contextmanager
def shortcuts_switched(switches: Shortcuts):
    """GPTQ.quantize_block with its Hessian collection changed as `switches` says."""

    def collect(block, names, last_pass=False, reference_order=False):
        view = _PerSequenceHooks(block) if switches.per_sequence_hessian else block
        last_pass = last_pass and not switches.full_block_outputs
        reference_order = reference_order or switches.reference_products
        if switches.float64_hessian:
            return _collect_float64(view, names, last_pass)
        if not switches.per_linear_hessians:
            return collect_hessians(view, names, last_pass, reference_order)
        accumulators, timing = {}, {"forward_seconds": 0.0, "hessian_seconds": 0.0}
        for name in names:
            one, _ = collect_hessians(view, [name], last_pass and name == names[-1], reference_order)
            accumulators.update(one)
        return accumulators, timing

    with mock.patch.object(gptq_module, "collect_hessians", collect):
        yield


def quantlab_blocks(model, arch, originals, calib_ids, n_blocks, config, batch_size=8, switches=Shortcuts()):
    """quantize_model on copies of the first `n_blocks` blocks; results by full linear name."""
    model.model.layers = nn.ModuleList(copy.deepcopy(block) for block in originals[:n_blocks])
    method = RecordingGPTQ(config)
    with shortcuts_switched(switches):
        report = quantize_model(model, arch, method, calib_ids, torch.device("cpu"), batch_size, progress=False)
    return {
        r.name: LayerResult(method.hessians[r.name], report.formats[r.name].codes, r.info["loss"]) for r in report.layers
    }


def differences(ours: dict[str, LayerResult], theirs: dict[str, LayerResult]) -> dict[str, dict]:
    """Per linear: max |dH| relative to max |H|, the share of codes that differ, both losses."""
    out = {}
    for name, a in ours.items():
        b = theirs[name]
        h_diff = (a.hessian - b.hessian).abs().max().item()
        out[name] = {
            "hessian_equal": torch.equal(a.hessian, b.hessian),
            "hessian_max_abs": h_diff,
            "hessian_max_rel": h_diff / b.hessian.abs().max().item(),
            "codes_differ": (a.codes.float() != b.codes.float()).float().mean().item(),
            "loss": a.loss,
            "loss_theirs": b.loss,
        }
    return out


def assert_identical(ours: dict[str, LayerResult], theirs: dict[str, LayerResult]) -> None:
    assert list(ours) == list(theirs)
    for name, a in ours.items():
        b = theirs[name]
        assert torch.equal(a.hessian, b.hessian), f"{name}: Hessians differ"
        assert torch.equal(a.codes.float(), b.codes.float()), f"{name}: codes differ"
        assert a.loss == b.loss, f"{name}: loss {a.loss} != {b.loss}"


# ---------------------------------------------------------------------------------------------
# Tests


def test_rechunked_inputs_are_views_of_the_same_sequences():
    from quantlab.experiments.run.pipeline import BlockInputs

    hidden = [torch.randn(3, 4, 2), torch.randn(2, 4, 2)]
    mask = [torch.randn(3, 1, 4, 4), torch.randn(2, 1, 4, 4)]
    cos = torch.randn(1, 4, 2)
    inputs = BlockInputs(hidden, [{"attention_mask": m, "position_embeddings": (cos, cos), "x": None} for m in mask])
    ones = inputs.rechunked(1)
    assert [h.shape[0] for h in ones.hidden] == [1] * 5
    assert torch.equal(torch.cat(ones.hidden), torch.cat(hidden))
    assert torch.equal(torch.cat([kw["attention_mask"] for kw in ones.kwargs]), torch.cat(mask))
    assert all(kw["position_embeddings"][0] is cos and kw["x"] is None for kw in ones.kwargs)
    assert ones.hidden[0].data_ptr() == hidden[0].data_ptr()  # views
    assert [h.shape[0] for h in inputs.rechunked(2).hidden] == [2, 1, 2]


def test_reference_numerics_config_and_forward_batch():
    assert GPTQConfig().reference_numerics is False
    assert GPTQ(GPTQConfig()).sequences_per_forward is None
    assert GPTQ(GPTQConfig(reference_numerics=True)).sequences_per_forward == 1


def test_reference_numerics_equals_the_transcription_on_a_tiny_llama(tiny_llama, single_thread):
    """Both blocks of a random llama, calibration chunks of 4 sequences (6 in all): the driver
    must run them one at a time and accumulate as the reference does."""
    torch.manual_seed(0)
    calib_ids = torch.randint(0, 1000, (6, 48))
    model, arch = tiny_llama.model, tiny_llama.architecture
    originals = list(model.model.layers)
    expected = literal_llama_sequential(model, calib_ids, n_blocks=2, wbits=3, groupsize=32)
    config = GPTQConfig(bits=3, group_size=32, reference_numerics=True)
    ours = quantlab_blocks(model, arch, originals, calib_ids, 2, config, batch_size=4)
    assert_identical(ours, expected)


# The SmolLM2 checks: C4 windows drawn as for `calib=c4 calib.seed=0`, fewer and shorter than the
# issue's 128 x 512 so that the module stays at a few tens of seconds (the script runs those).
N_SAMPLES, SEQLEN, N_BLOCKS = 16, 256, 2


@pytest.fixture(scope="module")
def smollm2_blocks(data_dir):
    """One thread throughout: on the shared 2-core CPU, two threads made this module 4x slower."""
    from quantlab.experiments.data.calibration import CalibrationSpec, calibration_samples
    from tests.conftest import _load

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    loaded = _load("smollm2-135m")  # a private copy: its block list is replaced below
    calib_ids = calibration_samples(CalibrationSpec("c4", N_SAMPLES, SEQLEN, seed=0), loaded.tokenizer)
    originals = list(loaded.model.model.layers)
    expected = literal_llama_sequential(loaded.model, calib_ids, N_BLOCKS)
    yield loaded, originals, calib_ids, expected
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_reference_numerics_equals_the_transcription_on_smollm2(smollm2_blocks):
    loaded, originals, calib_ids, expected = smollm2_blocks
    config = GPTQConfig(bits=3, group_size=128, reference_numerics=True)
    ours = quantlab_blocks(loaded.model, loaded.architecture, originals, calib_ids, N_BLOCKS, config)
    assert_identical(ours, expected)


@pytest.mark.slow
def test_shared_hessians_and_the_residual_output_pass_do_not_change_a_bit(smollm2_blocks):
    """Two of the fast path's shortcuts are exact in floating point too: the reference's Hessians
    of linears that share an input are equal to the bit (same operations on the same tensor), and
    quantlab's per-linear passes and full-block outputs give the fast path's results unchanged."""
    loaded, originals, calib_ids, expected = smollm2_blocks
    for i in range(N_BLOCKS):
        for group in (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]):
            first, *rest = (expected[f"model.layers.{i}.{name}"].hessian for name in group)
            assert all(torch.equal(first, other) for other in rest)
    model, arch = loaded.model, loaded.architecture
    config = GPTQConfig(bits=3, group_size=128)
    fast = quantlab_blocks(model, arch, originals, calib_ids, N_BLOCKS, config)
    slow = Shortcuts(per_linear_hessians=True, full_block_outputs=True)
    assert_identical(quantlab_blocks(model, arch, originals, calib_ids, N_BLOCKS, config, switches=slow), fast)


# ---------------------------------------------------------------------------------------------
# The attribution, as a script.

VARIANTS = {
    "fast path (default)": Shortcuts(),
    "one sequence per forward": Shortcuts(one_sequence_per_forward=True),
    "per-sequence Hessian, batched forwards": Shortcuts(per_sequence_hessian=True),
    "reference X^T X products": Shortcuts(reference_products=True),
    "a Hessian per linear": Shortcuts(per_linear_hessians=True),
    "full-block output pass": Shortcuts(full_block_outputs=True),
    "Hessian summed in fp64": Shortcuts(float64_hessian=True),
    "reference_numerics=true": None,
}


def _summary(diff: dict[str, dict]) -> str:
    n_equal = sum(d["hessian_equal"] for d in diff.values())
    max_rel = max(d["hessian_max_rel"] for d in diff.values())
    codes = sum(d["codes_differ"] for d in diff.values()) / len(diff)
    loss = sum(d["loss"] for d in diff.values())
    return f"{n_equal}/{len(diff)} | {max_rel:.2e} | {codes:.3%} | {loss:.6g}"


def main() -> None:
    import os
    import time

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=4, help="blocks for the propagation table")
    parser.add_argument("--seeds", type=int, nargs="*", default=[], help="extra calibration seeds (block 0)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from quantlab.experiments.data.calibration import CalibrationSpec, calibration_samples
    from tests.conftest import SHARED_DATA, _load  # (offline, as the tests)

    os.environ.setdefault("QUANTLAB_DATA_DIR", str(SHARED_DATA))

    loaded = _load("smollm2-135m")
    model, arch = loaded.model, loaded.architecture
    originals = list(model.model.layers)

    def ids_for(seed):
        return calibration_samples(CalibrationSpec("c4", args.nsamples, args.seqlen, seed=seed), loaded.tokenizer)

    def pick(results, i):
        return {k: v for k, v in results.items() if k.startswith(f"model.layers.{i}.")}

    calib_ids = ids_for(0)
    fast_config, ref_config = GPTQConfig(bits=3, group_size=128), GPTQConfig(bits=3, group_size=128, reference_numerics=True)
    start = time.perf_counter()
    expected = literal_llama_sequential(model, calib_ids, args.blocks)
    print(f"transcription, {args.blocks} blocks: {time.perf_counter() - start:.0f} s")
    block0 = pick(expected, 0)

    print(f"\nBlock 0, C4 {args.nsamples} x {args.seqlen} seed 0, W3 g128 asym; each row against the transcription")
    print("| variant | Hessians equal | max rel. dH | codes differ (mean of the linears) | sum of losses | same as fast path |")
    print("|---|---|---|---|---|---|")
    results = {}
    for name, switches in VARIANTS.items():
        config = ref_config if switches is None else fast_config
        batch = 1 if switches is not None and switches.one_sequence_per_forward else 8
        results[name] = quantlab_blocks(model, arch, originals, calib_ids, 1, config, batch, switches or Shortcuts())
        fast = results["fast path (default)"]
        same = all(torch.equal(results[name][k].codes, fast[k].codes) for k in fast)
        print(f"| {name} | {_summary(differences(results[name], block0))} | {'yes' if same else 'no'} |")
    print(f"| transcription | | | | {sum(r.loss for r in block0.values()):.6g} | |")

    print("\nBlock 0 per linear, fast path against the transcription (reference_numerics=true: identical)")
    print("| linear | max abs. dH | max rel. dH | codes differ | loss, fast | loss, reference |")
    print("|---|---|---|---|---|---|")
    for name, d in differences(results["fast path (default)"], block0).items():
        short = name.removeprefix("model.layers.0.")
        print(f"| {short} | {d['hessian_max_abs']:.2e} | {d['hessian_max_rel']:.2e} | {d['codes_differ']:.3%} "
              f"| {d['loss']:.6g} | {d['loss_theirs']:.6g} |")

    print(f"\nBlocks 0-{args.blocks - 1} (each on its predecessors' quantized outputs)")
    fast = quantlab_blocks(model, arch, originals, calib_ids, args.blocks, fast_config)
    ours = quantlab_blocks(model, arch, originals, calib_ids, args.blocks, ref_config)
    print("| block | reference_numerics: identical | fast: codes differ (mean of the linears) | fast: max rel. dH | sum of losses, fast | reference |")
    print("|---|---|---|---|---|---|")
    for i in range(args.blocks):
        d_ours, d_fast = differences(pick(ours, i), pick(expected, i)), differences(pick(fast, i), pick(expected, i))
        identical = all(d["hessian_equal"] and d["codes_differ"] == 0 and d["loss"] == d["loss_theirs"]
                        for d in d_ours.values())
        codes = sum(d["codes_differ"] for d in d_fast.values()) / len(d_fast)
        print(f"| {i} | {'yes' if identical else 'NO'} | {codes:.3%} | {max(d['hessian_max_rel'] for d in d_fast.values()):.2e} "
              f"| {sum(d['loss'] for d in d_fast.values()):.6g} | {sum(d['loss_theirs'] for d in d_fast.values()):.6g} |")

    if args.seeds:
        print("\nBlock 0, sum of losses per calibration seed")
        print("| seed | fast path | reference_numerics | codes differ, fast vs reference | codes differ vs seed 0 (reference) |")
        print("|---|---|---|---|---|")
        base = results["reference_numerics=true"]
        for seed in [0, *args.seeds]:
            ids = calib_ids if seed == 0 else ids_for(seed)
            f = results["fast path (default)"] if seed == 0 else quantlab_blocks(model, arch, originals, ids, 1, fast_config)
            r = base if seed == 0 else quantlab_blocks(model, arch, originals, ids, 1, ref_config)
            d, d0 = differences(f, r), differences(r, base)
            print(f"| {seed} | {sum(x.loss for x in f.values()):.6g} | {sum(x.loss for x in r.values()):.6g} "
                  f"| {sum(x['codes_differ'] for x in d.values()) / len(d):.3%} "
                  f"| {sum(x['codes_differ'] for x in d0.values()) / len(d0):.3%} |")


if __name__ == "__main__":
    main()
