"""PCT-Net performance options: activation checkpointing, channels-last, the one-gather window partition, bf16."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_pctnet import GOLDEN, TINY, assert_close_to_golden, golden_net, load_golden

from misfm_nets import PCTNet
from misfm_nets.swin import window_indices, window_partition, window_reverse


def _train_step(net, x, seed):
    """One seeded train-mode step (dropout, DropPath and BatchNorm active); outputs and gradients by name."""
    torch.manual_seed(seed)
    outs = net.forward_all_heads(x)  # in training the same as net(x) with deep supervision; in eval all four
    sum(o.square().mean() * (i + 1) for i, o in enumerate(outs)).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], grads


@pytest.mark.slow  # three full-size training steps per case: minutes on 2 cores
@pytest.mark.parametrize("resolution_mode,mode", [(0, True), (1, True), (1, "attention")])
def test_checkpointing_gives_the_same_outputs_gradients_and_norm_statistics(resolution_mode, mode):
    torch.manual_seed(0)
    plain = PCTNet(1, 3, (32, 64, 64), deep_supervision=True, resolution_mode=resolution_mode, **TINY).train()
    ckpt = copy.deepcopy(plain)
    ckpt.checkpointing = mode
    x = torch.randn(2, 1, 32, 64, 64)
    outs_a, grads_a = _train_step(plain, x, seed=1)
    outs_b, grads_b = _train_step(ckpt, x, seed=1)
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 100
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)
    # BatchNorm must count the batch once, not again when the checkpointed blocks are recomputed.
    state_a, state_b = plain.state_dict(), ckpt.state_dict()
    assert list(state_a) == list(state_b)
    for name in state_a:
        torch.testing.assert_close(state_a[name], state_b[name], atol=0, rtol=0, msg=name)


def test_checkpointing_is_a_no_op_in_eval_and_no_grad():
    torch.manual_seed(0)
    net = PCTNet(1, 2, (32, 64, 64), checkpointing=True, **TINY).eval()
    assert net.checkpointing and all(m.checkpointing for m in (*net.embeddings, net.pyramid_ct, *net.pred_heads))
    x = torch.randn(1, 1, 32, 64, 64)
    with torch.no_grad():
        a = net(x)
    net.checkpointing = False
    with torch.no_grad():
        b = net(x)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("options", [{"checkpointing": True}, {"checkpointing": "attention"}, {"channels_last": True}])
def test_options_keep_the_state_dict_layout(options):
    lines = (GOLDEN / "pctnet_keys_default.txt").read_text().splitlines()
    expected = [line.split("\t")[0] for line in lines if not line.startswith("#")]
    net = PCTNet(1, 5, (64, 128, 128), deep_supervision=True, **options)
    state = net.state_dict()
    assert list(state) == expected
    plain = PCTNet(1, 5, (64, 128, 128), deep_supervision=True)
    plain.load_state_dict(state)  # strict, both ways
    net.load_state_dict(plain.state_dict())


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_channels_last_matches_the_golden_outputs(mode):
    golden = load_golden(mode)
    net = golden_net(golden).eval()
    net.channels_last = True
    net.load_state_dict(golden["state_dict"], strict=False)
    assert net.pyramid_ct.down3.conv[2].weight.is_contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        outputs = net.forward_all_heads(golden["input"])
    for ours, ref in zip(outputs, golden["outputs"]):
        assert ours.is_contiguous()
        assert_close_to_golden(ours, ref)


def test_channels_last_gradients_match_contiguous():
    # Eval mode (BatchNorm on running statistics, no dropout): train-mode BatchNorm on a tiny random net at
    # batch 2 is so ill-conditioned that float32 gradients of early layers are off by percents against a
    # float64 run with either layout (reduction order), which would hide nothing and prove nothing.
    torch.manual_seed(0)
    plain = PCTNet(1, 3, (32, 64, 64), deep_supervision=True, axis_order="xyz", **TINY).eval()
    cl = copy.deepcopy(plain)
    cl.channels_last = True
    x = torch.randn(2, 1, 64, 64, 32)
    outs_a, grads_a = _train_step(plain, x, seed=3)
    outs_b, grads_b = _train_step(cl, x, seed=3)
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # float32 reduction order differs between layouts (and between CPUs: oneDNN picks kernels per ISA), so a
    # parameter whose gradient is tiny is compared on the scale of the whole network's gradients
    scale = max(float(g.abs().max()) for g in grads_a.values())
    for name in grads_a:
        a, b = grads_a[name], grads_b[name]
        assert float((a - b).abs().max()) <= 1e-3 * float(a.abs().max()) + 1e-5 * scale, name


@pytest.mark.parametrize("shape,window,shift", [((8, 8, 8), 6, 3), ((6, 12, 18), 6, 3), ((7, 5, 9), 4, 2),
                                                 ((12, 12, 12), 6, 0), ((8, 8, 8), 6, 0)])
def test_window_gather_equals_pad_roll_partition(shape, window, shift):
    b, c = 2, 5
    x = torch.randn(b, *shape, c)
    padded = [-(-n // window) * window for n in shape]
    ref = F.pad(x, (0, 0, 0, padded[2] - shape[2], 0, padded[1] - shape[1], 0, padded[0] - shape[0]))
    if shift:
        ref = torch.roll(ref, shifts=(-shift,) * 3, dims=(1, 2, 3))
    ref_windows = window_partition(ref, window)
    gather, scatter = window_indices(b, shape, window, shift, x)
    flat = x.reshape(-1, c)
    if list(padded) != list(shape):
        flat = F.pad(flat, (0, 0, 0, 1))
    windows = flat.index_select(0, gather).view(b, -1, window**3, c)
    torch.testing.assert_close(windows, ref_windows, atol=0, rtol=0)
    # the inverse gather undoes partition, shift and padding
    back = windows.reshape(-1, c).index_select(0, scatter).view(b, *shape, c)
    torch.testing.assert_close(back, x, atol=0, rtol=0)
    rev = window_reverse(ref_windows, window, *padded)
    if shift:
        rev = torch.roll(rev, shifts=(shift,) * 3, dims=(1, 2, 3))
    torch.testing.assert_close(back, rev[:, : shape[0], : shape[1], : shape[2]], atol=0, rtol=0)


def test_batch_size_change_reuses_nothing_stale():
    torch.manual_seed(0)
    net = PCTNet(1, 2, (32, 64, 64), **TINY).eval()
    x = torch.randn(2, 1, 32, 64, 64)
    with torch.no_grad():
        one = torch.cat([net(x[:1]), net(x[1:])])
        both = net(x)
    torch.testing.assert_close(one, both, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_stays_close_to_the_fp32_golden_outputs():
    # Measured on CPU (benchmarks/bench_pctnet.py --accuracy): argmax agreement >= 99 %, error <= ~2 % of the range.
    golden = load_golden(1)
    net = golden_net(golden).eval()
    net.load_state_dict(golden["state_dict"], strict=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(golden["input"]).float()
    ref = golden["outputs"][0]
    assert float((out - ref).abs().max() / ref.abs().max()) < 0.1
    assert float((out.argmax(1) == ref.argmax(1)).float().mean()) > 0.95


@pytest.mark.parametrize("shifted,recompute", [(False, False), (True, False), (False, True), (True, True)])
def test_attention_dropout_path_equals_the_explicit_formula(shifted, recompute):
    # Train mode with attention dropout on the CPU: explicit softmax under checkpointing, same draws as unfused.
    from misfm_nets.fast_cpu import _keep_mask
    from misfm_nets.swin import WindowAttention, shift_mask

    torch.manual_seed(0)
    attn = WindowAttention(16, 4, 2, attn_drop=0.3).train()
    attn.recompute_attention = recompute
    windows = torch.randn(2, 8, 64, 16, requires_grad=True)
    mask = shift_mask((8, 8, 8), 4, 2, windows) if shifted else None
    torch.manual_seed(5)
    out = attn(windows, mask)
    out.square().sum().backward()
    grads = [windows.grad.clone(), attn.relative_position_bias_table.grad.clone(), attn.qkv.weight.grad.clone()]
    windows.grad = None
    attn.zero_grad()
    b, nw, n, c = windows.shape
    qkv = attn.qkv(windows).view(b, nw, n, 3, 2, c // 2).permute(3, 0, 1, 4, 2, 5)
    scores = (qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1)
    scores = scores + attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(n, n, 2).permute(
        2, 0, 1
    )
    if mask is not None:
        scores = scores + mask.unsqueeze(1)
    torch.manual_seed(5)
    keep, scale = _keep_mask(scores, 0.3)  # the same draw as the layer's dropout
    ref = ((scores.softmax(-1) * keep * scale) @ qkv[2]).transpose(2, 3).reshape(b, nw, n, c)
    ref = attn.proj(ref)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    ref.square().sum().backward()
    for ours, theirs in zip(grads, [windows.grad, attn.relative_position_bias_table.grad, attn.qkv.weight.grad]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
