"""The checkpoint loader on the golden weights and the formats users bring."""

from __future__ import annotations

import logging

import pytest
import torch
from monai.networks.nets import UNet
from test_pctnet import assert_close_to_golden, golden_net, load_golden

from misfm_nets import PCTNet, load_pretrained


@pytest.fixture(scope="module")
def golden():
    return load_golden(1)


def _assert_same_outputs(net, golden):
    with torch.no_grad():
        out = net.eval()(golden["input"])  # eval mode: the full-resolution logits only
    assert_close_to_golden(out, golden["outputs"][0])


def test_plain_state_dict_loads_everything(golden, caplog):
    net = golden_net(golden)
    with caplog.at_level(logging.INFO, logger="misfm_nets.pretrained"):
        report = load_pretrained(net, golden["state_dict"])
    assert len(report.loaded) == len(golden["state_dict"])
    assert report.skipped == [] and report.missing == [] and report.unexpected == []
    assert f"loaded {len(report.loaded)} entries" in caplog.text
    _assert_same_outputs(net, golden)


def test_pymic_file_with_ddp_prefixes(golden, tmp_path):
    path = tmp_path / "pctnet_ct10k_volf.pt"
    prefixed = {f"module.{k}": v for k, v in golden["state_dict"].items()}
    torch.save({"model_state_dict": prefixed, "iteration": 10}, path)
    net = golden_net(golden)
    report = load_pretrained(net, str(path))
    assert len(report.loaded) == len(golden["state_dict"]) and report.unexpected == []
    _assert_same_outputs(net, golden)


def test_other_class_count_skips_and_reports_the_heads(golden):
    config = dict(golden["config"], class_num=7)
    net = golden_net({"config": config})
    fresh_head = net.pred_heads[1].out_conv0.conv[2].weight.clone()
    report = load_pretrained(net, golden["state_dict"])
    skipped = {name: (ck, ours, why) for name, ck, ours, why in report.skipped}
    assert "pred_heads.1.out_conv0.conv.2.weight" in skipped
    assert skipped["pred_heads.1.out_conv0.conv.2.weight"] == ((3, 4, 1, 1, 1), (7, 4, 1, 1, 1), "class count differs")
    assert all(".out_conv" in name for name in skipped)
    assert len(skipped) == 2 * 8  # weight + bias of 2 pyramid heads and 2 output convs in each of 3 heads
    torch.testing.assert_close(net.pred_heads[1].out_conv0.conv[2].weight, fresh_head)  # left as initialised
    loaded = golden["state_dict"]["pyramid_ct.down3.conv.2.weight"]
    torch.testing.assert_close(net.pyramid_ct.down3.conv[2].weight, loaded)
    assert "class count differs" in report.summary()


def test_encoder_mode_leaves_every_head_alone(golden):
    net = golden_net(golden)
    report = load_pretrained(net, golden["state_dict"], mode="encoder")
    assert report.skipped and all("mode='encoder'" in why for *_, why in report.skipped)
    assert not any(".out_conv" in name for name in report.loaded)


def test_another_network_is_an_error_not_a_partial_load(golden):
    unet = UNet(3, 1, 3, channels=(4, 8), strides=(2,))
    net = golden_net(golden)
    before = net.pyramid_ct.down3.conv[2].weight.clone()
    with pytest.raises(ValueError, match="does not fit PCTNet"):
        load_pretrained(net, unet.state_dict())
    torch.testing.assert_close(net.pyramid_ct.down3.conv[2].weight, before)


def test_bad_sources_are_explained(tmp_path):
    net = PCTNet(1, 3, (32, 64, 64), feature_channels=(4, 8, 16, 32, 64), num_heads=(2, 4, 8))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(net, tmp_path / "absent.pt")
    not_weights = tmp_path / "notes.pt"
    not_weights.write_text("this is not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_pretrained(net, not_weights)
    with pytest.raises(ValueError, match="no tensors"):
        load_pretrained(net, {"epoch": 3})
    with pytest.raises(ValueError, match="mode"):
        load_pretrained(net, {}, mode="decoder")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_ddp_wrapped_or_compiled_network_is_unwrapped(golden):
    # The target, not only the checkpoint: load_pretrained(ddp_model, ...) and load_pretrained(compiled, ...)
    # must load into the network inside (whose parameters the wrapper shares), with no prefix mismatch.
    import torch.distributed as dist

    compiled = torch.compile(golden_net(golden))  # not run: no compilation happens
    report = load_pretrained(compiled, golden["state_dict"])
    assert len(report.loaded) == len(golden["state_dict"]) and report.missing == []
    _assert_same_outputs(compiled._orig_mod, golden)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(golden_net(golden))
        report = load_pretrained(ddp, {f"module.{k}": v for k, v in golden["state_dict"].items()})
        assert len(report.loaded) == len(golden["state_dict"]) and report.missing == []
        _assert_same_outputs(ddp.module, golden)
    finally:
        dist.destroy_process_group()
