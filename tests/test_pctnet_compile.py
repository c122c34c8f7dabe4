"""PCT-Net under torch.compile (fullgraph), torch.jit.trace and torch.export, and its per-shape window cache.

Compiled tests use backend="aot_eager": it runs the same dynamo graph capture (``fullgraph=True`` fails on any
graph break) and AOTAutograd's joint forward/backward graph and recomputation partitioner as inductor, without
inductor's code generation, which takes minutes per graph on a 2-core CI machine.
"""

from __future__ import annotations

import copy

import pytest
import torch

from misfm_nets import PCTNet
from misfm_nets.swin import WINDOW_CACHE_SIZE, SwinBlock

TINY = dict(feature_channels=(4, 8, 16, 32, 64), num_heads=(2, 4, 8))
SIZE = (16, 32, 32)


def _steps(model, net, x, steps):
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = sum(o.square().mean() for o in model(x))
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


@pytest.mark.slow  # dynamo + AOTAutograd graph capture: tens of seconds each on 2 cores
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_training_fullgraph_matches_eager(checkpointing):
    # No dropout, so the compiled and the eager step draw nothing and must agree; checkpointing=True must not
    # count a batch twice in the BatchNorm statistics when the compiled backward recomputes the blocks.
    torch.manual_seed(0)
    net = PCTNet(1, 2, SIZE, deep_supervision=True, dropout=(0.0,) * 5, drop_path=0.0, checkpointing=checkpointing,
                 **TINY).train()
    eager = copy.deepcopy(net)
    eager.checkpointing = False
    x = torch.randn(2, 1, *SIZE)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    losses = _steps(compiled, net, x, 3)
    reference = _steps(eager, eager, x, 3)
    assert losses == pytest.approx(reference, rel=1e-4)
    assert losses[-1] < losses[0]
    for (name, a), b in zip(net.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=name)  # weights after 3 steps, running stats


@pytest.mark.slow  # dynamo + AOTAutograd graph capture: tens of seconds each on 2 cores
def test_compiled_training_with_dropout_and_attention_checkpointing():
    # The default dropout / DropPath and the explicit-softmax attention with its checkpoint, in one graph.
    torch.manual_seed(0)
    net = PCTNet(1, 2, SIZE, deep_supervision=True, checkpointing="attention", **TINY).train()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    losses = _steps(compiled, net, torch.randn(2, 1, *SIZE), 2)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_inference_mode_forward_then_a_training_step():
    # The window cache built under inference_mode must still serve autograd afterwards.
    torch.manual_seed(0)
    net = PCTNet(1, 2, SIZE, deep_supervision=True, **TINY)
    x = torch.randn(1, 1, *SIZE)
    with torch.inference_mode():
        net.eval()(x)
    losses = _steps(net.train(), net, x, 1)
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad) and losses


def test_window_cache_is_bounded_and_follows_the_device():
    net = PCTNet(1, 2, SIZE, **TINY).eval()
    blocks = [m for m in net.modules() if isinstance(m, SwinBlock)]
    with torch.no_grad():
        for depth in range(1, 7):  # six input shapes
            net(torch.randn(1, 1, 8 * depth, 32, 32))
    assert all(0 < len(b._windows) <= WINDOW_CACHE_SIZE for b in blocks)
    net.to("meta")  # the cached CPU tensors go with the move
    assert all(len(b._windows) == 0 for b in blocks)
    out = net(torch.zeros(1, 1, *SIZE, device="meta"))
    assert out.device.type == "meta" and all(k[-1].type == "meta" for b in blocks for k in b._windows)


def test_window_tensors_of_a_monai_batch_are_plain_tensors():
    """MONAI trainers feed collated MetaTensor batches: the cached window indices and masks must not inherit their
    batch metadata (slicing an index tensor would slice that metadata too, and fail on some batches)."""
    from monai.data import MetaTensor, list_data_collate

    # no dropout: the MetaTensor then reaches the transformer blocks unchanged (as in the bundles' DDP test)
    net = PCTNet(1, 2, SIZE, deep_supervision=True, dropout=(0.0,) * 5, drop_path=0.0, **TINY).train()
    batch = list_data_collate([{"image": MetaTensor(torch.randn(1, *SIZE), affine=torch.eye(4))} for _ in range(2)])
    assert isinstance(batch["image"], MetaTensor) and batch["image"].is_batch
    outputs = net(batch["image"])
    assert len(outputs) == 4
    cached = [t for b in net.modules() if isinstance(b, SwinBlock) for v in b._windows.values() for t in v
              if t is not None]
    assert cached and all(type(t) is torch.Tensor for t in cached)


def test_trace_and_export_hold_no_device_constant():
    # Traced / exported on the CPU, both run on meta tensors: any index, mask or arange made with device="cpu"
    # would raise a device mismatch there.
    torch.manual_seed(0)
    net = PCTNet(1, 2, SIZE, **TINY).eval()
    x = torch.randn(1, 1, *SIZE)
    traced = torch.jit.trace(net, x)
    exported = torch.export.export(net, (x,)).module()
    with torch.no_grad():
        expected = net(x)
        torch.testing.assert_close(traced(x), expected)
        torch.testing.assert_close(exported(x), expected)
    meta = torch.zeros(1, 1, *SIZE, device="meta")
    for graph in (traced, exported):
        out = graph.to("meta")(meta)
        assert out.device.type == "meta" and out.shape == expected.shape
