"""The fast CPU kernels compute what the stock modules they stand in for compute, with the kernels we claim, and
the switch ``PCTNet(fast_cpu_kernels=...)`` decides where they run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from misfm_nets import PCTNet, fast_cpu
from misfm_nets.fast_cpu import _keep_mask, dropout, window_attention

TINY = dict(feature_channels=(4, 8, 16, 32, 64), num_heads=(2, 4, 8))


def _profiled_ops(fn) -> set:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def _outputs_and_grads(conv: nn.Module, x: torch.Tensor, channels_last: bool, fast: bool):
    x = x.clone().requires_grad_()
    conv.zero_grad(set_to_none=True)
    inp = x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x
    y = fast_cpu.forward(conv, inp) if fast else conv(inp)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return y.detach(), x.grad, conv.weight.grad, None if conv.bias is None else conv.bias.grad


@pytest.mark.parametrize(
    "shape, out_channels, kernel, padding",
    [
        ((1, 8, 8, 16, 16), 8, (3, 3, 3), 1),  # small: PyTorch would take slow_conv3d
        ((1, 4, 6, 12, 10), 6, (1, 3, 3), (0, 1, 1)),  # in-plane kernel, odd sizes
        ((1, 6, 4, 8, 8), 5, (3, 3, 3), 1),  # odd out channels: stock path
        ((2, 4, 8, 8, 8), 4, (3, 3, 3), 1),  # batch 2: PyTorch already uses oneDNN
        ((1, 12, 5, 6, 7), 3, 1, 0),  # pointwise
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_conv3d_matches_torch(shape, out_channels, kernel, padding, channels_last, bias):
    torch.manual_seed(0)
    conv = nn.Conv3d(shape[1], out_channels, kernel, padding=padding, bias=bias)
    x = torch.randn(shape)
    fast, stock = (_outputs_and_grads(conv, x, channels_last, fast) for fast in (True, False))
    for a, b in zip(fast, stock):
        if a is None or b is None:
            assert a is None and b is None
            continue
        # float32 sums in another order: tolerance on the scale of each tensor
        torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, float(b.abs().max())), rtol=1e-5)


def test_conv3d_routes_small_convolutions_to_onednn():
    conv, x = nn.Conv3d(8, 8, 3, padding=1), torch.randn(1, 8, 8, 16, 16)
    assert "aten::slow_conv3d_forward" in _profiled_ops(lambda: conv(x))  # the case we fix
    ops = _profiled_ops(lambda: fast_cpu.forward(conv, x))
    assert "aten::mkldnn_convolution" in ops and "aten::slow_conv3d_forward" not in ops
    pointwise = _profiled_ops(lambda: fast_cpu.forward(nn.Conv3d(8, 4, 1), x))
    assert not any("conv" in op for op in pointwise)


def test_the_switch_is_on_only_for_float32_cpu_training(monkeypatch):
    x = torch.randn(2, 3)
    assert fast_cpu.active(None, x, training=True) and fast_cpu.active(True, x, training=True)
    assert not fast_cpu.active(False, x, training=True)
    assert not fast_cpu.active(None, x, training=False)  # eval: stock (double backward, export)
    assert not fast_cpu.active(None, x.double(), training=True)
    assert not fast_cpu.active(None, torch.zeros(2, device="meta"), training=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fast_cpu.active(True, x, training=True)
    def doubled_if_active(t):
        return t * 2 if fast_cpu.active(True, t, training=True) else t

    assert torch.equal(torch.jit.trace(doubled_if_active, x, check_trace=False)(x), x)
    assert torch.equal(torch.compile(doubled_if_active, backend="eager", fullgraph=True)(x), x)
    # auto means "on the torch versions the kernels were tested against"; True forces them on another one
    monkeypatch.setattr(fast_cpu, "TESTED_TORCH_VERSIONS", ())
    assert not fast_cpu.active(None, x, training=True) and fast_cpu.active(True, x, training=True)


def test_dropout_keeps_the_expectation_and_a_bool_mask():
    torch.manual_seed(0)
    x = torch.ones(400_000, requires_grad=True)
    y = dropout(x, 0.2)
    kept = y != 0
    assert abs(float(kept.float().mean()) - 0.8) < 0.003
    # four 15-bit numbers per 64-bit draw: each of the four positions keeps at the same rate
    assert torch.allclose(kept.view(-1, 4).float().mean(0), torch.full((4,), 0.8), atol=0.006)
    assert abs(float(y.mean()) - 1.0) < 0.005  # scaled by the exact inverse keep probability
    assert torch.all(y[kept] == y[kept][0])
    assert [t.dtype for t in y.grad_fn.saved_tensors] == [torch.bool]  # 1 byte per element kept for backward
    y.backward(torch.full_like(y, 2.0))
    torch.testing.assert_close(x.grad, torch.where(kept, 2.0 * y[kept][0], 0.0))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_masked_scale_walks_both_tensors_in_memory_order(layout, monkeypatch):
    monkeypatch.setattr(fast_cpu, "_CHUNK", 1000)
    x = torch.randn(2, 3, 5, 6, 7)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "strided":  # not dense: the mask is drawn contiguous and applied unchunked
        x = torch.randn(2, 3, 5, 6, 14)[..., ::2]
    keep, scale = _keep_mask(x, 0.3)
    assert keep.dtype == torch.bool and keep.shape == x.shape
    assert keep.stride() == (x.stride() if layout != "strided" else x.contiguous().stride())
    expected = torch.where(keep, x * scale, 0.0)
    assert torch.equal(fast_cpu._masked_scale(x, keep, scale, torch.empty_like(keep, dtype=x.dtype)), expected)
    in_place = x.clone()
    assert torch.equal(fast_cpu._masked_scale(in_place, keep, scale, in_place), expected)
    other = x.contiguous() if layout == "channels_last" else x.contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(fast_cpu._masked_scale(other, keep, scale, torch.empty_like(other)), expected)
    grad = torch.randn_like(x)
    expected = float((grad.double() * x.double().clamp(max=0)).sum())
    assert fast_cpu._dot_negative_part(grad, x) == pytest.approx(expected, rel=1e-5)


def test_dropout_is_seeded_and_stock_where_it_should_be():
    x = torch.randn(1000, requires_grad=True)
    torch.manual_seed(3)
    a = dropout(x, 0.5)
    torch.manual_seed(3)
    b = fast_cpu.forward(nn.Dropout(0.5), x)
    assert torch.equal(a, b)
    assert torch.equal(fast_cpu.forward(nn.Dropout(0.5).eval(), x), x)
    assert torch.equal(dropout(x, 0.0), x)
    assert float((dropout(x, 1.0) == 0).float().mean()) == 1.0
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout(x, 1.5)


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
def test_window_attention_matches_autograd_with_the_same_mask(shifted, recompute, monkeypatch):
    monkeypatch.setattr(fast_cpu, "_CHUNK", 1000)  # several chunks in the elementwise passes
    torch.manual_seed(0)
    b, nw, h, n, d = 2, 3, 4, 27, 8
    q, k, v = (torch.randn(b, nw, h, n, d, requires_grad=True) for _ in range(3))
    bias = torch.randn(h, n, n, requires_grad=True)
    mask = torch.where(torch.rand(nw, n, n) < 0.3, -100.0, 0.0) if shifted else None
    torch.manual_seed(7)
    out = window_attention(q, k, v, bias, mask, 0.35, 0.25, recompute)
    big = [t for t in out.grad_fn.saved_tensors if t is not None and t.numel() >= b * nw * h * n * n]
    # the score-sized tensors kept: the bool mask, and the float probabilities unless recomputed
    assert sorted(str(t.dtype) for t in big) == (["torch.bool"] if recompute else ["torch.bool", "torch.float32"])
    grad = torch.randn_like(out)
    out.backward(grad)
    # reference: plain autograd with the same dropout draw
    torch.manual_seed(7)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, bias)]
    q2, k2, v2, bias2 = leaves
    scores = (q2 * 0.35) @ k2.transpose(-2, -1) + bias2 + (mask.unsqueeze(1) if shifted else 0.0)
    keep, scale = _keep_mask(scores, 0.25)
    ref = (scores.softmax(-1) * keep * scale) @ v2
    ref.backward(grad)
    torch.testing.assert_close(out, ref)
    for ours, theirs in zip((q, k, v, bias), leaves):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-5)


def _stock_pre_activation(norm, act, conv, x, keep=None, scale=1.0):
    h = act(norm(x))
    if keep is not None:
        h = h * keep * scale
    return conv(h)


@pytest.mark.parametrize(
    "shape, out_channels, kernel, p",
    [
        ((1, 8, 8, 16, 16), 8, 3, 0.0),  # routed to oneDNN
        ((1, 8, 8, 16, 16), 8, 3, 0.3),  # with the block's dropout
        ((2, 4, 6, 12, 10), 6, (1, 3, 3), 0.0),  # batch 2, in-plane kernel: stock kernel
        ((1, 6, 4, 8, 8), 5, 3, 0.2),  # odd out channels: stock kernel
        ((1, 8, 8, 16, 16), 5, 1, 0.0),  # pointwise output head
        ((2, 6, 4, 8, 8), 4, "transposed", 0.0),  # up-sampling: ConvTranspose3d, kernel = stride = 2
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("slope", [0.1, -0.2])  # backward activates in place for positive slopes only
def test_pre_activation_conv_matches_autograd_and_keeps_only_its_input(
    shape, out_channels, kernel, p, channels_last, slope, monkeypatch
):
    from misfm_nets.fast_cpu import pre_activation_conv

    monkeypatch.setattr(fast_cpu, "_CHUNK", 1000)  # several chunks in the elementwise passes

    torch.manual_seed(0)

    def modules():
        torch.manual_seed(1)
        if kernel == "transposed":
            conv = nn.ConvTranspose3d(shape[1], out_channels, 2, stride=2)
        else:
            padding = tuple(k // 2 for k in ((kernel,) * 3 if isinstance(kernel, int) else kernel))
            conv = nn.Conv3d(shape[1], out_channels, kernel, padding=padding)
        norm, act = nn.BatchNorm3d(shape[1]), nn.PReLU()
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5), act.weight.fill_(slope)
        return norm, act, conv, nn.Dropout(p)

    x = torch.randn(shape) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    fused, stock = modules(), modules()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(5)
    ya = pre_activation_conv(*fused[:3], xa, fused[3])
    saved = [t for t in ya.grad_fn.saved_tensors if t is not None and t.numel() >= x.numel()]
    # x itself, and with dropout its bool mask: no float tensor the size of x but x
    assert [t.data_ptr() for t in saved if t.is_floating_point()] == [xa.data_ptr()]
    assert [t.dtype for t in saved if not t.is_floating_point()] == ([torch.bool] if p else [])
    torch.manual_seed(5)
    keep, scale = _keep_mask(x, p) if p else (None, 1.0)
    yb = _stock_pre_activation(*stock[:3], xb, keep, scale)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5 * float(xb.grad.abs().max()), rtol=1e-4)
    for a, b in zip(fused[:3], stock[:3]):
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, atol=1e-5 * float(pb.grad.abs().max()), rtol=1e-4, msg=name)
        for (name, ba), bb in zip(a.named_buffers(), b.buffers()):  # running statistics and batch count
            torch.testing.assert_close(ba, bb, msg=name)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_transformer_mlp_matches_autograd_and_keeps_no_activation(p, approximate, monkeypatch):
    from misfm_nets.fast_cpu import transformer_mlp

    monkeypatch.setattr(fast_cpu, "_CHUNK", 1000)  # several chunks in the elementwise passes
    torch.manual_seed(0)
    fc1, act, drop, fc2 = nn.Linear(6, 24), nn.GELU(approximate), nn.Dropout(p), nn.Linear(24, 6)
    x = torch.randn(2, 3, 4, 5, 6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(5)
    ya = transformer_mlp(fc1, act, drop, fc2, xa)
    saved = [t for t in ya.grad_fn.saved_tensors if t is not None and t.numel() >= 24 * x.numel() // 6]
    # the pre-activation, and with dropout the bool mask: the activation itself is recomputed
    assert sorted(str(t.dtype) for t in saved) == (["torch.bool", "torch.float32"] if p else ["torch.float32"])
    grad = torch.randn_like(ya)
    ya.backward(grad)
    ours = [xa.grad] + [t.grad.clone() for t in (fc1.weight, fc1.bias, fc2.weight, fc2.bias)]
    for t in (fc1.weight, fc1.bias, fc2.weight, fc2.bias):
        t.grad = None
    torch.manual_seed(5)
    hidden = act(fc1(xb))
    keep, scale = _keep_mask(hidden, p) if p else (torch.ones_like(hidden, dtype=torch.bool), 1.0)
    yb = fc2(hidden * keep * scale)
    torch.testing.assert_close(ya, yb)
    yb.backward(grad)
    for a, b in zip(ours, [xb.grad] + [t.grad for t in (fc1.weight, fc1.bias, fc2.weight, fc2.bias)]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the unfused path draws the same mask
        torch.manual_seed(5)
        torch.testing.assert_close(transformer_mlp(fc1, act, drop, fc2, x), ya.detach())


def test_fused_layers_survive_a_dropout_that_drops_everything():
    # p rounds to 2**15 / 2**15: every entry dropped, scale 0; backward must give zeros, not divide by the scale
    from misfm_nets.fast_cpu import pre_activation_conv

    x = torch.randn(1, 4, 4, 8, 8, requires_grad=True)
    y = pre_activation_conv(nn.BatchNorm3d(4), nn.PReLU(), nn.Conv3d(4, 4, 3, padding=1), x, nn.Dropout(1 - 1e-6))
    y.sum().backward()
    assert torch.count_nonzero(x.grad) == 0


def test_training_step_on_a_batched_meta_tensor():
    # MONAI pipelines feed batched MetaTensors: chunked views of them must not be taken as batch slices.
    from monai.data import MetaTensor, list_data_collate

    from misfm_nets import PCTNet

    torch.manual_seed(0)
    net = PCTNet(1, 2, (16, 32, 32), feature_channels=(4, 8, 16, 32, 64), num_heads=(2, 4, 8)).train()
    items = [{"image": MetaTensor(torch.randn(1, 16, 32, 32), meta={"filename_or_obj": f"case{i}.nii.gz"})}
             for i in range(2)]
    x = list_data_collate(items)["image"]
    assert isinstance(x, MetaTensor) and x.is_batch
    net(x).square().mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_eval_mode_keeps_double_backward():
    # Input-gradient penalties need create_graph in eval mode: there the layers stay on stock autograd.
    from misfm_nets import PCTNet

    net = PCTNet(1, 2, (16, 32, 32), feature_channels=(4, 8, 16, 32, 64), num_heads=(2, 4, 8)).eval()
    x = torch.randn(1, 1, 16, 32, 32, requires_grad=True)
    (grad,) = torch.autograd.grad(net(x).square().sum(), x, create_graph=True)
    grad.square().sum().backward()
    assert net.pyramid_ct.down3.conv[2].weight.grad is not None


def _training_step(fast_cpu_kernels, dropout=0.0, drop_path=0.0):
    torch.manual_seed(0)
    net = PCTNet(1, 3, (16, 32, 32), dropout=(dropout,) * 5, drop_path=drop_path, deep_supervision=True,
                 fast_cpu_kernels=fast_cpu_kernels, **TINY).train()
    x = torch.randn(1, 1, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    outs = net(x)
    sum(o.square().mean() for o in outs).backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], grads, dict(net.named_buffers())


def test_pctnet_training_step_equals_the_stock_layers():
    # Train mode (batch statistics, running-stat updates), no dropout so both draw nothing: the whole network on
    # the fast CPU kernels against the same network on stock PyTorch modules.
    stock, fast = _training_step(False), _training_step(None)
    for a, b in zip(fast[0], stock[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert fast[1].keys() == stock[1].keys()
    # Relative L2 error per parameter (measured <= 2e-3; a 1 % error in one layer's input gradient gives > 0.1).
    # Conv biases before a train-mode BatchNorm have a zero gradient in exact arithmetic: rounding noise, skipped.
    for name, ref in stock[1].items():
        if float(ref.norm()) > 1e-4:
            assert float((fast[1][name] - ref).norm() / ref.norm()) < 1e-2, name
    for name in stock[2]:
        torch.testing.assert_close(fast[2][name], stock[2][name], atol=1e-5, rtol=1e-4, msg=name)


def test_switch_off_runs_only_stock_modules(monkeypatch):
    # With fast_cpu_kernels=False no fast_cpu function is called (dropout and DropPath active); on auto they are.
    calls = []
    for name in ("forward", "dropout", "pre_activation_conv", "transformer_mlp", "window_attention"):
        original = getattr(fast_cpu, name)
        monkeypatch.setattr(fast_cpu, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    _training_step(False, dropout=0.2, drop_path=0.2)
    assert calls == []
    _training_step(None, dropout=0.2, drop_path=0.2)
    assert {"forward", "pre_activation_conv", "transformer_mlp", "window_attention"} <= set(calls)
    # and the stock ops are what ran: PyTorch's own dropout and its im2col kernel for the small convolutions
    ops = _profiled_ops(lambda: _training_step(False, dropout=0.2))
    assert {"aten::bernoulli_", "aten::slow_conv3d_forward"} <= ops


def test_pre_activation_conv_leaves_other_norm_layers_their_forward():
    # SyncBatchNorm (bundles' sync_batchnorm) must keep its cross-process statistics: only nn.BatchNorm3d fuses.
    from misfm_nets.fast_cpu import pre_activation_conv

    calls = []

    class RecordingNorm(nn.BatchNorm3d):
        def forward(self, x):
            calls.append(x.shape)
            return super().forward(x)

    x = torch.randn(1, 4, 4, 8, 8, requires_grad=True)
    pre_activation_conv(RecordingNorm(4), nn.PReLU(), nn.Conv3d(4, 4, 3, padding=1), x).sum().backward()
    assert calls == [x.shape]


def test_dropout_draws_the_same_mask_with_and_without_grad():
    # A reentrant checkpoint runs the forward without grad, then again with it: both must drop the same entries.
    x = torch.randn(5000, requires_grad=True)
    torch.manual_seed(11)
    with torch.no_grad():
        a = dropout(x, 0.3)
    torch.manual_seed(11)
    b = dropout(x, 0.3)
    assert torch.equal(a, b.detach())


def test_pre_activation_conv_keeps_module_hooks_working():
    # weight_norm / spectral_norm and feature hooks work through module hooks: with any, the modules are called.
    from misfm_nets.fast_cpu import pre_activation_conv

    seen = []
    conv = nn.Conv3d(4, 4, 3, padding=1)
    conv.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    x = torch.randn(1, 4, 4, 8, 8, requires_grad=True)
    y = pre_activation_conv(nn.BatchNorm3d(4), nn.PReLU(), conv, x)
    assert seen == [y.shape]


def test_double_backward_raises_instead_of_giving_wrong_second_derivatives():
    x = torch.randn(100, requires_grad=True)
    (grad,) = torch.autograd.grad(dropout(x, 0.5).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        grad.sum().backward()
