"""torch.compile falls back to eager only when the compiler fails, says so, and its start-up trial leaves no trace."""
import pytest
import torch
from torch import nn
from torch._dynamo.exc import Unsupported

import ddmim.train.compile as compile_module
from ddmim.errors import UserError
from ddmim.train.compile import CompiledForward, compile_report, is_compile_failure


class Net(nn.Module):
    """Batch-norm statistics and dropout: what a trial could change if it were not undone."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.norm(self.lin(x)))


class FailingBackward(torch.autograd.Function):
    """Stands for a compiled graph whose backward fails to compile at its first use."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise Unsupported("backward graph could not be compiled (simulated)")


def fake_compiler(monkeypatch, behaviour):
    """torch.compile replaced by `behaviour(module) -> callable`; the real one takes minutes on a CPU."""
    monkeypatch.setattr(compile_module.torch, "compile", lambda module, backend: behaviour(module))


def loss_of(forward):
    return forward(torch.randn(8, 4)).square().mean()


def test_a_backward_that_fails_to_compile_is_found_by_the_trial_and_falls_back(monkeypatch, capsys):
    fake_compiler(monkeypatch, lambda m: (lambda x: FailingBackward.apply(m(x))))
    net = Net()
    compiled = CompiledForward(net)
    compiled.trial(loss_of)
    assert compiled.status.startswith("fallback: Unsupported: backward graph could not be compiled")
    assert "continuing without compilation" in capsys.readouterr().err
    loss_of(compiled).backward()  # now eager: the backward works
    assert net.lin.weight.grad is not None


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory (simulated)"),
                                   ValueError("a batch of the wrong shape")])
def test_errors_that_are_not_the_compilers_are_raised_not_hidden(monkeypatch, error):
    def raises(module):
        def call(x):
            raise error
        return call

    fake_compiler(monkeypatch, raises)
    compiled = CompiledForward(Net())
    with pytest.raises(type(error)):
        compiled.trial(loss_of)
    with pytest.raises(type(error)):
        compiled(torch.randn(8, 4))
    assert compiled.status == "on"


def test_an_out_of_memory_error_inside_a_compiler_error_is_not_a_compile_failure():
    wrapped = Unsupported("autotuning failed")
    wrapped.__cause__ = torch.OutOfMemoryError("CUDA out of memory")
    assert not is_compile_failure(wrapped)
    assert is_compile_failure(Unsupported("graph break in a place dynamo cannot handle"))
    assert not is_compile_failure(RuntimeError("a data error"))


def test_a_failure_at_a_later_recompilation_falls_back_for_that_call(monkeypatch):
    calls = []

    def compiles_once(module):
        def call(x):
            calls.append(x.shape[0])
            if len(calls) > 1:
                raise Unsupported("recompilation for a new shape failed (simulated)")
            return module(x)
        return call

    fake_compiler(monkeypatch, compiles_once)
    net = Net().eval()
    compiled = CompiledForward(net)
    compiled(torch.randn(8, 4))
    x = torch.randn(6, 4)
    torch.testing.assert_close(compiled(x), net(x))
    assert compiled.status.startswith("fallback: Unsupported: recompilation")
    assert compile_report(compiled)["compile"] == compiled.status and compile_report(None) == {"compile": "off"}


def test_the_trial_compiles_for_real_and_leaves_no_trace():
    torch.manual_seed(0)
    net = Net()
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    compiled = CompiledForward(net, backend="aot_eager")  # dynamo and AOTAutograd, without inductor's code generation
    state = torch.get_rng_state()
    compiled.trial(loss_of)
    assert torch.equal(torch.get_rng_state(), state)  # dropout's and the batch's draws are undone
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(v, buffers[k]) for k, v in net.state_dict().items())  # running statistics too
    report = compiled.report()
    assert report["compile"] == "on" and report["graphs"] >= 1 and report["graph_breaks"] == 0


def test_an_unknown_backend_is_one_line():
    with pytest.raises(UserError, match="train.compile_backend 'nope' is not a torch.compile backend; available:"):
        CompiledForward(Net(), backend="nope")
