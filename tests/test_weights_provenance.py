"""Weights with provenance: misfm-convert, large_files.yml downloads (loopback server) and digests re-checked
before a bundle loads a file."""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from misfm_bundle_glue import weights
from misfm_demo import convert
from misfm_nets import PCTNet

import build
import bundle_utils as bu

TINY_SET = ["feature_channels=[4,8,16,32,64]", "num_heads=[2,4,8]", "roi_size=[32,32,16]"]
TINY = {"feature_channels": [4, 8, 16, 32, 64], "num_heads": [2, 4, 8], "roi_size": [32, 32, 16]}


def _pymic_checkpoint(path: Path, classes: int = 5, nan: bool = False) -> dict:
    """A checkpoint in the published MIS-FM / PyMIC format: {"model_state_dict": ..., "iteration": ...}."""
    net = PCTNet(1, classes, TINY["roi_size"], feature_channels=TINY["feature_channels"], num_heads=TINY["num_heads"],
                 axis_order="xyz")
    state = net.state_dict()
    if nan:
        state["pyramid_ct.down3.conv.2.weight"].fill_(float("nan"))
    torch.save({"model_state_dict": state, "iteration": 200000}, path)
    return state


def test_convert_pymic_checkpoint_to_a_bundle_model(tmp_path, capsys):
    state = _pymic_checkpoint(tmp_path / "pctnet_ct10k_volf.pt")
    out = tmp_path / "models" / "model.pt"
    assert convert.main([str(tmp_path / "pctnet_ct10k_volf.pt"), str(out), "--set", *TINY_SET]) == 0
    printed = capsys.readouterr().out
    saved = torch.load(out, weights_only=True)  # a plain state dict, as the bundle's CheckpointLoader expects
    assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in state)
    assert "loaded " in printed and f"SHA-256 {hashlib.sha256(out.read_bytes()).hexdigest()}" in printed
    assert not [p for p in out.parent.iterdir() if p.name != "model.pt"]  # no temporary file left


def test_convert_for_a_downstream_bundle_reports_the_skipped_heads(tmp_path, capsys):
    _pymic_checkpoint(tmp_path / "src.pt")
    assert convert.main([str(tmp_path / "src.pt"), str(tmp_path / "init.pt"), "--bundle", "abdomen", "--mode",
                         "encoder", "--set", *TINY_SET]) == 0
    printed = capsys.readouterr().out
    assert "skipped" in printed and "prediction head" in printed
    saved = torch.load(tmp_path / "init.pt", weights_only=True)
    assert saved["pred_heads.1.out_conv0.conv.2.weight"].shape[0] == 14  # the abdomen classes, fresh


@pytest.mark.parametrize("kind,words", [("foreign", "does not fit"), ("nan", "NaN/Inf weights")])
def test_convert_refuses_what_cannot_be_a_pct_net(tmp_path, capsys, kind, words):
    src = tmp_path / "src.pt"
    if kind == "foreign":
        torch.save(torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.Conv3d(4, 2, 1)).state_dict(), src)
    else:
        _pymic_checkpoint(src, nan=True)
    with pytest.raises(SystemExit) as exit_info:
        convert.main([str(src), str(tmp_path / "out.pt"), "--set", *TINY_SET])
    assert exit_info.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


# ------------------------------------------------------------------------------------------------ large files


class _FileServer:
    """Serves bytes on loopback; ``/cut/<name>`` announces the full length but closes after half of it."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def __enter__(self) -> str:
        files = self.files

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                cut = self.path.startswith("/cut/")
                data = files.get(self.path.removeprefix("/cut/").lstrip("/"))
                if data is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2] if cut else data)
                if cut:
                    self.wfile.flush()
                    self.connection.shutdown(2)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def bundle_copy(tmp_path):
    """The thorax bundle as released (the build's own file list), outside the repository."""
    name = "misfm_thorax_ct_segmentation"
    root = tmp_path / name
    for arcname, data in build.release_files(name).items():
        (root / arcname).parent.mkdir(parents=True, exist_ok=True)
        (root / arcname).write_bytes(data)
    return root


def _download_large_files(bundle: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monai.bundle", "download_large_files", "--bundle_path", str(bundle)],
                          capture_output=True, encoding="utf-8", errors="replace", timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["right", "wrong_hash", "interrupted"])
def test_large_files_download_checks_the_hash(bundle_copy, tmp_path, case):
    payload = os.urandom(300_000)
    digest = hashlib.sha256(payload).hexdigest()
    with _FileServer({"model.pt": payload}) as url:
        entry = {"path": "models/model.pt", "url": f"{url}/{'cut/' if case == 'interrupted' else ''}model.pt",
                 "hash_val": digest if case != "wrong_hash" else "0" * 64}
        (bundle_copy / "large_files.yml").write_text(build.render_large_files(bundle_copy.name, [entry]))
        done = _download_large_files(bundle_copy)
    target = bundle_copy / "models" / "model.pt"
    if case == "right":
        assert done.returncode == 0, done.stderr[-3000:]
        assert target.read_bytes() == payload
    else:
        assert done.returncode != 0
        assert not target.exists()  # nothing half-written or unverified is left where the bundle would load it
        if case == "wrong_hash":
            assert "hash check" in done.stderr


def test_a_recorded_digest_is_checked_before_loading(bundle_copy, tmp_path):
    model = bundle_copy / "models" / "model.pt"
    model.parent.mkdir()
    model.write_bytes(b"weights")
    (bundle_copy / "large_files.yml").write_text(build.render_large_files(bundle_copy.name, [
        {"path": "models/model.pt", "url": "http://127.0.0.1:9/x",
         "hash_val": hashlib.sha256(b"weights").hexdigest()}]))
    recorded = weights.recorded_sha256(str(model), str(bundle_copy))
    assert recorded == hashlib.sha256(b"weights").hexdigest()
    weights.verify_sha256(str(model), recorded, "model")  # the recorded file passes
    model.write_bytes(b"other weights")
    with pytest.raises(ValueError, match="is not the file that was recorded"):
        weights.verify_sha256(str(model), recorded, "model")
    assert weights.recorded_sha256(str(bundle_copy / "other.pt"), str(bundle_copy)) is None


def test_pretrained_checkpoint_sha256_is_checked_before_loading(tmp_path):
    _pymic_checkpoint(tmp_path / "src.pt")
    net = PCTNet(1, 5, TINY["roi_size"], feature_channels=TINY["feature_channels"], num_heads=TINY["num_heads"],
                 axis_order="xyz")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="is not the file that was recorded"):
        weights.load_pretrained_weights(net, str(tmp_path / "src.pt"), "all", sha256="ab" * 32)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing was loaded
    loaded = weights.load_pretrained_weights(net, str(tmp_path / "src.pt"), "all",
                                             sha256=hashlib.sha256((tmp_path / "src.pt").read_bytes()).hexdigest())
    assert loaded.sha256 == hashlib.sha256((tmp_path / "src.pt").read_bytes()).hexdigest()


@pytest.mark.slow
def test_inference_refuses_a_model_that_is_not_the_recorded_one(tmp_path, bundle_copy):
    """The released bundle, run as downloaded: its large_files.yml records model.pt's digest; a different file
    in its place stops inference before it loads."""
    datalist = bu.make_dataset(tmp_path / "ds", 5, n_train=0, n_val=0, n_test=1, labels=False)
    model = bundle_copy / "models" / "model.pt"
    model.parent.mkdir()
    torch.save(PCTNet(1, 5, TINY["roi_size"], feature_channels=TINY["feature_channels"], num_heads=TINY["num_heads"],
                      axis_order="xyz").state_dict(), model)
    (bundle_copy / "large_files.yml").write_text(build.render_large_files(bundle_copy.name, [
        {"path": "models/model.pt", "url": "http://127.0.0.1:9/x", "hash_val": "cd" * 32}]))
    args = dict(TINY, num_workers=0, amp=False, data_list_file_path=str(datalist),
                dataset_dir=str(datalist.parent / "data"),
                output_dir=str(tmp_path / "pred"))
    r = bu.run_bundle(bundle_copy, "run", ["inference.json"], args, tmp_path / "w")
    assert r.returncode != 0 and "is not the file that was recorded" in r.stdout + r.stderr
    assert not list((tmp_path / "pred").rglob("*.nii.gz"))
