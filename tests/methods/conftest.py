"""A fake BlockView over a tiny llama-like block, for method tests without a model.

`run(hooks, stop_after)` replays stored calibration inputs in chunks of `batch_size` sequences;
each hooked linear's hook receives the chunk's input as [batch, seqlen, in_features] (the
BlockView contract, as experiments/run/pipeline.py does), and the forward stops right after
`stop_after`'s input has been seen. `calls` counts the forwards that
reached each linear, so tests can check that no compute was wasted.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantlab.kernels import QuantizedWeight


class TinyBlock(nn.Module):
    """q/k/v -> o -> gate/up -> down, executed in that order."""

    def __init__(self, hidden: int = 32, intermediate: int = 48) -> None:
        super().__init__()
        self.q = nn.Linear(hidden, hidden, bias=False)
        self.k = nn.Linear(hidden, hidden, bias=False)
        self.v = nn.Linear(hidden, hidden, bias=False)
        self.o = nn.Linear(hidden, hidden, bias=False)
        self.gate = nn.Linear(hidden, intermediate, bias=False)
        self.up = nn.Linear(hidden, intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.q(x) * torch.sigmoid(self.k(x)) + self.v(x)
        h = x + self.o(attn)
        return h + self.down(F.silu(self.gate(h)) * self.up(h))


class _Stop(Exception):
    pass


class FakeBlockView:
    def __init__(
        self,
        module: TinyBlock,
        inputs: torch.Tensor,
        true_sequential_default: bool = True,
        batch_size: int = 1,
    ) -> None:
        self.index = 0
        self.name = "layers.0"
        self.family = "llama"
        self.module = module
        self.inputs = inputs  # [n_sequences, tokens, hidden]
        self.batch_size = batch_size
        self.linears = {name: getattr(module, name) for name in ("q", "k", "v", "o", "gate", "up", "down")}
        self.sequential_groups = [["k", "v", "q"], ["o"], ["up", "gate"], ["down"]]
        self.true_sequential_default = true_sequential_default
        self.scaling_groups = ()
        self.input_groups = ()
        self.n_sequences = inputs.shape[0]
        self.n_tokens = inputs.shape[0] * inputs.shape[1]
        self.calls: Counter[str] = Counter()
        self.runs: list[str | None] = []
        self.records: dict[str, dict] = {}

    def run(self, hooks=None, stop_after=None, last_pass=False) -> None:
        hooks = hooks or {}
        self.runs.append(stop_after)

        def make_pre_hook(name):
            def pre_hook(module, args):
                self.calls[name] += 1
                if name in hooks:
                    hooks[name](args[0])
                if name == stop_after:
                    raise _Stop

            return pre_hook

        handles = [lin.register_forward_pre_hook(make_pre_hook(name)) for name, lin in self.linears.items()]
        try:
            with torch.no_grad():
                for chunk in self.inputs.split(self.batch_size):
                    try:
                        self.module(chunk)
                    except _Stop:
                        pass
        finally:
            for handle in handles:
                handle.remove()

    def submodule(self, name: str) -> nn.Module:
        return self.module.get_submodule(name)

    def capture(self, names):
        """Each named sub-module's calls, one per chunk (the BlockView contract)."""
        from quantlab.methods.block import ModuleCall

        calls = {name: [] for name in names}

        def make_hook(name):
            return lambda _m, args, kwargs: calls[name].append(ModuleCall(tuple(args), dict(kwargs)))

        handles = [
            self.submodule(n).register_forward_pre_hook(make_hook(n), with_kwargs=True) for n in names
        ]
        try:
            with torch.no_grad():
                for chunk in self.inputs.split(self.batch_size):
                    self.module(chunk)
        finally:
            for handle in handles:
                handle.remove()
        return calls

    def commit(self, name: str, qweight: QuantizedWeight, seconds: float, **info: object) -> None:
        linear = self.linears[name]
        linear.weight.data = qweight.dequantize(linear.weight.dtype)
        self.records[name] = {"qweight": qweight, "seconds": seconds, **info}


def correlated_inputs(n: int, features: int, seed: int = 0) -> torch.Tensor:
    """Rows with strongly correlated features and uneven scales (like LLM activations)."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=gen) / features**0.5
    mixing += torch.eye(features) * 0.3
    scales = torch.exp(torch.randn(features, generator=gen))
    return (torch.randn(n, features, generator=gen) @ mixing) * scales


@pytest.fixture
def correlated():
    return correlated_inputs


@pytest.fixture
def make_block():
    def make(seed=0, n_sequences=6, tokens=16, true_sequential_default=True, batch_size=1):
        torch.manual_seed(seed)
        module = TinyBlock()
        inputs = correlated_inputs(n_sequences * tokens, 32, seed).reshape(n_sequences, tokens, 32)
        return FakeBlockView(module, inputs, true_sequential_default, batch_size)

    return make


@pytest.fixture
def single_thread():
    """Tiny matrices: extra OpenMP threads only spin on the shared CPU (modules opt in with
    `pytestmark = pytest.mark.usefixtures("single_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
