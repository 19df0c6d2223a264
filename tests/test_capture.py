"""The capture utility: pre-hook inputs and cloned stores against direct computations, lifecycle, reductions,
early stop, dtype rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zeroshot_kd.capture import Capture, CaptureError
from zeroshot_kd.errors import ZkdError

pytestmark = pytest.mark.usefixtures("one_thread")


class Twice(nn.Module):
    """Calls one in-place ReLU twice, as torchvision's BasicBlock does."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.lin(x)) + x
        return self.head(self.relu(out))


def _net() -> Twice:
    torch.manual_seed(0)
    return Twice()


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_inputs_are_read_before_in_place_ops_and_stores_are_copies():
    net = _net()
    x = torch.randn(6, 4)
    with torch.no_grad():
        lin = net.lin(x)
        pre = lin.relu() + x                    # the second ReLU call's input, computed without in-place ops
    assert pre.min() < 0 and lin.min() < 0
    with Capture(net, ["relu@in", "lin", "head@in"]) as cap:
        net(x)
    # the last call of a module called twice; its input before the in-place ReLU overwrote it
    torch.testing.assert_close(cap.features["relu@in"], pre)
    # the stored output is a copy: the ReLU that consumed it in place did not change it
    torch.testing.assert_close(cap.features["lin"], lin)
    torch.testing.assert_close(cap.features["head@in"], pre.relu())
    assert cap.calls == {"relu@in": 2, "lin": 1, "head@in": 1}
    with Capture(net, ["lin"], clone=False) as raw:      # without a copy: overwritten by the ReLU
        net(x)
    torch.testing.assert_close(raw.features["lin"], lin.relu())


def test_hooks_are_removed_on_exit_and_on_exceptions():
    net = _net()
    with Capture(net, ["relu@in", "head"]):
        assert not _no_hooks(net)
    assert _no_hooks(net)
    with pytest.raises(RuntimeError, match="boom"):
        with Capture(net, ["relu@in", "head"]):
            raise RuntimeError("boom")
    assert _no_hooks(net)
    with pytest.raises(CaptureError, match="not a tensor"):   # an error raised by the hook itself
        with Capture(net, ["lin@in"]):
            net.lin(input=torch.randn(2, 4))                 # keyword call: no positional input to read
    assert _no_hooks(net)
    with pytest.raises(ZkdError, match="no module 'nope'"):
        Capture(net, ["nope@in"])
    with pytest.raises(ZkdError, match="stop_after"):
        Capture(net, ["lin"], stop_after="head")


def test_pause_clear_take_and_detach():
    net = _net()
    x = torch.randn(3, 4)
    cap = Capture(net, ["head"]).open()
    with cap.paused():
        net(x)
    assert cap.features == {} and cap.calls["head"] == 0
    y = net(x)
    got = cap.take()
    assert cap.features == {} and torch.equal(got["head"], y)
    # stored features keep the graph (the copy is differentiable): their gradient equals the output's
    got["head"].sum().backward()
    g_capture = net.head.bias.grad.clone()
    net.zero_grad()
    net(x).sum().backward()
    torch.testing.assert_close(g_capture, net.head.bias.grad)
    cap.close()
    with Capture(net, ["head"], detach=True) as det:
        net(x)
    assert not det.features["head"].requires_grad
    assert _no_hooks(net)


def test_reduce_streams_every_call_without_storing():
    net = _net()
    xs = [torch.randn(5, 4) for _ in range(3)]
    sums: dict[str, float] = {}

    def add(addr: str, t: torch.Tensor) -> None:
        sums[addr] = sums.get(addr, 0.0) + float(t.double().sum())

    with torch.no_grad(), Capture(net, ["relu@in", "lin"], reduce=add) as cap:
        for x in xs:
            net(x)
    assert cap.features == {}
    expected_in = expected_lin = 0.0
    with torch.no_grad():
        for x in xs:
            lin = net.lin(x)
            expected_lin += float(lin.double().sum())
            expected_in += float(lin.double().sum()) + float((lin.relu() + x).double().sum())  # both calls
    assert sums["lin"] == pytest.approx(expected_lin, rel=1e-6)
    assert sums["relu@in"] == pytest.approx(expected_in, rel=1e-6)


def test_stop_after_skips_the_rest_of_the_forward():
    net = _net()
    x = torch.randn(2, 4)
    with torch.no_grad(), Capture(net, ["lin@in", "lin"], stop_after="lin") as cap, \
            Capture(net, ["head"], reduce=lambda a, t: None) as later:
        assert cap.run(x) is None
        assert cap.calls["lin"] == 1 and later.calls["head"] == 0      # nothing after lin ran
    with torch.no_grad():
        torch.testing.assert_close(cap.features["lin"], net.lin(x))
    with torch.no_grad(), Capture(net, ["lin@in"], stop_after="lin@in") as cap, \
            Capture(net, ["lin"], reduce=lambda a, t: None) as inside:
        assert cap.run(x) is None
        assert inside.calls["lin"] == 0                                 # stopped before the module itself ran
        assert torch.equal(cap.features["lin@in"], x)
    with Capture(net, ["head"]) as full:                                # without stop_after, run is the forward
        torch.testing.assert_close(full.run(x), net(x))


def test_single_input_rejects_other_signatures():
    class Two(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.two = Two()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.two(x, x)

    net = Outer()
    with Capture(net, ["two@in"], single_input=True) as cap, pytest.raises(CaptureError, match="one tensor"):
        cap.run(torch.randn(2))
    with Capture(net, ["two@in"]) as cap:                               # otherwise: the first input
        cap.run(torch.ones(2))
    assert torch.equal(cap.features["two@in"], torch.ones(2))


def test_captured_tensors_keep_the_forwards_dtype():
    net = _net()
    x = torch.randn(2, 4)
    with Capture(net, ["lin", "lin@in"]) as cap, torch.autocast("cpu", dtype=torch.bfloat16):
        net(x)
    assert cap.features["lin"].dtype == torch.bfloat16      # as autocast produced it: no cast in the capture
    assert cap.features["lin@in"].dtype == torch.float32
