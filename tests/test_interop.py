"""`ssdd import` / `ssdd export` / `ssdd.load_distilled`: other tools' distilled sets in, ours out.

Each foreign file is written here the way its reference code writes it: KRR-ST's Logger does
``torch.save(x_syn)`` / ``torch.save(y_syn)`` of leaf tensors that require grad; MKDT's distill.py
saves ``images_<it>.pt``, ``labels_<it>.pt`` and ``synlr_<it>.pt`` (a 0-d tensor)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ssdd
from ssdd.artifacts import load_encoder, read_meta
from ssdd.distilled_set import load_arrays, save_arrays
from ssdd.cli import main

import test_cli_errors
from test_cli_errors import assert_one_line_error

TINY = ["--no-progress", "--set", "evaluate.seeds=1", "--set", "pretrain.epochs=1", "--set", "model.widths=[8, 8]"]
MEAN, STD = [0.5071, 0.4865, 0.4409], [0.2009, 0.1984, 0.2023]  # MKDT's CIFAR-100 statistics


def run_cli(args, capsys):
    return test_cli_errors.run_cli([str(a) for a in args], capsys)


def krr_st_files(folder, n=12, d=8, labels=False):
    """Reference-code layout: raw pixel/255 images (drifted a little outside [0, 1] by optimisation)."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(n, 3, 16, 16, generator=gen) * 1.1 - 0.05).requires_grad_(True)
    y = torch.arange(n) % 3 if labels else torch.randn(n, d, generator=gen).requires_grad_(True)
    torch.save(x, folder / "x_syn.pt")
    torch.save(y, folder / "y_syn.pt")
    return x.detach(), y.detach()


def mkdt_files(folder, its=(0, 500), n=10, d=6):
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    for it in its:
        pixels = torch.rand(n, 3, 16, 16, generator=gen)
        x = (pixels - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1)
        y = torch.randn(n, d, generator=gen)
        torch.save(x.requires_grad_(True), folder / f"images_{it}.pt")
        torch.save(y.requires_grad_(True), folder / f"labels_{it}.pt")
        torch.save(torch.tensor(0.01 + it * 1e-5).requires_grad_(True), folder / f"synlr_{it}.pt")
    return x.detach(), y.detach()


def test_import_krr_st_then_pretrain(tmp_path, capsys):
    x, y = krr_st_files(tmp_path / "krr")
    out = tmp_path / "distilled" / "krr_c100.safetensors"
    code, lines = run_cli(["import", tmp_path / "krr" / "x_syn.pt", tmp_path / "krr" / "y_syn.pt", "--format", "krr_st",
                           "--out", out], capsys)
    assert code == 0, lines
    images, targets, meta = load_arrays(out)
    assert torch.equal(images, x) and torch.equal(targets, y)
    assert meta["objective"] == "mse" and meta["image_space"] == "reference" and meta["lr"] is None
    assert meta["method"] == "krr_c100" and len(meta["mean"]) == 3 and len(meta["std"]) == 3
    assert meta["image_space_note"].startswith("reference") and "model_spec" not in meta
    assert meta["imported_from"]["format"] == "krr_st"
    # pretrain --distilled: no model_spec in the set, so the config's model is used
    assert main(["pretrain", "--distilled", str(out), "--out", str(tmp_path / "p"), *TINY]) == 0
    _, emeta = load_encoder(tmp_path / "p" / "encoders" / "krr_c100.safetensors")
    assert emeta["model_spec"]["out_dim"] == 8 and emeta["model_spec"]["widths"] == [8, 8]
    assert emeta["model_spec"]["in_channels"] == 3 and emeta["model_spec"]["image_size"] == 16
    rng = np.random.default_rng(0)
    target = tmp_path / "target.npz"
    np.savez(target, x_train=rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8), y_train=np.arange(24) % 3,
             x_test=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8), y_test=np.arange(12) % 3)
    assert main(["evaluate", "--encoder", str(tmp_path / "p" / "encoders" / "krr_c100.safetensors"), "--targets",
                 f"npz:{target}", "--out", str(tmp_path / "e"), "--protocols", "linear", "--label-fractions", "1.0",
                 "--set", "data.size=16", *TINY]) == 0
    assert {r["method"] for r in json.loads((tmp_path / "e" / "results.json").read_text())} == {"krr_c100"}


def test_import_krr_st_folder_with_labels(tmp_path, capsys):
    """The reference code's baselines (dm, random, ...) store integer labels in y_syn.pt."""
    krr_st_files(tmp_path / "dm", labels=True)
    out = tmp_path / "dm.safetensors"
    assert run_cli(["import", tmp_path / "dm", "--format", "krr_st", "--out", out], capsys)[0] == 0
    _, targets, meta = load_arrays(out)
    assert meta["objective"] == "cross_entropy" and targets.shape == (12, 3)
    assert torch.equal(targets.argmax(1), torch.arange(12) % 3) and torch.equal(targets.sum(1), torch.ones(12))


def test_import_mkdt_normalised_with_lr_then_pretrain(tmp_path, capsys):
    x, y = mkdt_files(tmp_path / "mkdt")
    out = tmp_path / "mkdt.safetensors"
    code, lines = run_cli(["import", tmp_path / "mkdt", "--format", "mkdt", "--out", out], capsys)
    assert_one_line_error(code, lines, "--mean")  # MKDT's images are normalised: the statistics are needed
    assert not out.exists()
    code, lines = run_cli(["import", tmp_path / "mkdt", "--format", "mkdt", "--out", out, "--mean", *MEAN,
                           "--std", *STD], capsys)
    assert code == 0, lines
    images, targets, meta = load_arrays(out)
    assert torch.equal(images, x) and torch.equal(targets, y)  # the folder's last iteration (500)
    assert meta["image_space"] == "normalized" and meta["objective"] == "mse"
    assert meta["mean"] == pytest.approx(MEAN) and meta["std"] == pytest.approx(STD)
    assert meta["lr"] == pytest.approx(0.015)
    files = [tmp_path / "mkdt" / f for f in ("images_0.pt", "labels_0.pt", "synlr_0.pt")]
    assert run_cli(["import", *files, "--format", "mkdt", "--out", out, "--mean", *MEAN, "--std", *STD], capsys)[0] == 0
    assert read_meta(out)["lr"] == pytest.approx(0.01)
    assert main(["pretrain", "--distilled", str(out), "--out", str(tmp_path / "p"), *TINY]) == 0
    assert (tmp_path / "p" / "encoders" / "mkdt.safetensors").is_file()


def test_import_npz_detects_space_and_labels(tmp_path, capsys):
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw.npz"
    np.savez(raw, images=rng.random((8, 3, 8, 8), dtype=np.float32), labels=np.arange(8) % 4, lr=np.float32(0.05))
    out = tmp_path / "raw.safetensors"
    assert run_cli(["import", raw, "--format", "npz", "--out", out], capsys)[0] == 0
    _, targets, meta = load_arrays(out)
    assert meta["image_space"] == "reference" and "within [0, 1]" in meta["imported_from"]["image_space"]
    assert meta["objective"] == "cross_entropy" and targets.shape == (8, 4) and meta["lr"] == pytest.approx(0.05)

    normed = tmp_path / "normed.npz"
    np.savez(normed, x=rng.standard_normal((8, 3, 8, 8)).astype(np.float32), y=np.eye(5)[np.arange(8) % 5])
    code, lines = run_cli(["import", normed, "--format", "npz", "--out", out], capsys)
    assert_one_line_error(code, lines, "normalised")
    assert run_cli(["import", normed, "--format", "npz", "--out", out, "--mean", "0.5", "--std", "0.25"], capsys)[0] == 0
    _, targets, meta = load_arrays(out)
    assert meta["image_space"] == "normalized" and meta["mean"] == [0.5] * 3 and meta["std"] == [0.25] * 3
    assert meta["objective"] == "cross_entropy" and targets.shape == (8, 5)  # one-hot rows
    assert run_cli(["import", normed, "--format", "npz", "--out", out, "--image-space", "raw"], capsys)[0] == 0
    assert read_meta(out)["image_space"] == "reference"

    pixels = tmp_path / "pixels.npz"  # uint8 channels-last pixels, real-valued targets
    np.savez(pixels, images=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), targets=rng.standard_normal((6, 4)))
    assert run_cli(["import", pixels, "--format", "npz", "--out", out], capsys)[0] == 0
    images, _, meta = load_arrays(out)
    assert images.shape == (6, 3, 8, 8) and meta["objective"] == "mse" and meta["image_space"] == "reference"


def test_import_imagefolder_class_folders(tmp_path, capsys):
    rng = np.random.default_rng(0)
    arrays = {}
    for cls in ("cat", "dog"):
        (tmp_path / "set" / cls).mkdir(parents=True)
        for i in range(3):
            arrays[(cls, i)] = a = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / "set" / cls / f"{i}.png")
    out = tmp_path / "folder.safetensors"
    assert run_cli(["import", tmp_path / "set", "--format", "imagefolder", "--out", out], capsys)[0] == 0
    images, targets, meta = load_arrays(out)
    assert images.shape == (6, 3, 8, 8) and meta["class_names"] == ["cat", "dog"]
    assert meta["objective"] == "cross_entropy" and targets.argmax(1).tolist() == [0, 0, 0, 1, 1, 1]
    assert meta["image_space"] == "reference"
    expect = torch.from_numpy(np.stack([arrays[(c, i)] for c in ("cat", "dog") for i in range(3)])).permute(0, 3, 1, 2)
    assert torch.equal((images * 255).round().to(torch.uint8), expect)


@pytest.mark.parametrize("how", ["open", "os.system"])
def test_malicious_pickle_is_refused_without_running(tmp_path, capsys, how):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w")) if how == "open" else (os.system, (f"touch {marker}",))

    krr_st_files(tmp_path / "krr")
    torch.save({"y": Evil()}, tmp_path / "krr" / "y_syn.pt")
    out = tmp_path / "evil.safetensors"
    code, lines = run_cli(["import", tmp_path / "krr", "--format", "krr_st", "--out", out], capsys)
    assert_one_line_error(code, lines, "y_syn.pt: refused")
    assert not marker.exists() and not out.exists()


def _set(path, space):
    gen = torch.Generator().manual_seed(2)
    pixels = torch.rand(7, 3, 8, 8, generator=gen)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    images = pixels if space == "reference" else \
        (pixels - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    targets = torch.randn(7, 5, generator=gen)
    save_arrays(path, images, targets, {"method": "mine", "objective": "mse", "lr": 0.02, "image_space": space,
                                        "mean": mean, "std": std, "fingerprint": "abc",
                                        "model_spec": {"arch": "convnet", "in_channels": 3, "image_size": 8,
                                                       "widths": [8], "pool": "gap", "out_dim": 5}})
    return images, targets, std


@pytest.mark.parametrize("space", ["normalized", "reference"])
def test_export_import_round_trip(tmp_path, capsys, space):
    src = tmp_path / "mine.safetensors"
    images, targets, std = _set(src, space)
    folder = tmp_path / "export"
    assert run_cli(["export", src, "--format", "imagefolder", "--out", folder], capsys)[0] == 0
    assert len(list(folder.glob("*.png"))) == 7 and (folder / "targets.npz").is_file()
    with np.load(folder / "targets.npz", allow_pickle=False) as z:
        assert str(z["objective"]) == "mse" and float(z["lr"]) == pytest.approx(0.02)
        assert np.array_equal(z["targets"], targets.numpy())
    back = tmp_path / "back.safetensors"
    assert run_cli(["import", folder, "--format", "imagefolder", "--out", back], capsys)[0] == 0
    images2, targets2, meta = load_arrays(back)
    assert meta["image_space"] == space and meta["objective"] == "mse" and meta["lr"] == pytest.approx(0.02)
    assert meta["model_spec"]["widths"] == [8] and "fingerprint" not in meta
    assert torch.equal(targets2, targets)
    scale = torch.tensor(std).view(1, -1, 1, 1) if space == "normalized" else 1.0
    assert ((images2 - images).abs() * scale).max() <= 0.5 / 255 + 1e-5  # in pixel units: uint8 quantisation only
    # an earlier export is replaced; a folder holding other things is not touched
    assert run_cli(["export", src, "--format", "imagefolder", "--out", folder], capsys)[0] == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    code, lines = run_cli(["export", src, "--format", "imagefolder", "--out", tmp_path / "other"], capsys)
    assert_one_line_error(code, lines, "not an earlier export")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep"
    # npz: exact
    npz = tmp_path / "mine.npz"
    assert run_cli(["export", src, "--format", "npz", "--out", npz], capsys)[0] == 0
    assert run_cli(["import", npz, "--format", "npz", "--out", back], capsys)[0] == 0
    images3, targets3, meta3 = load_arrays(back)
    assert torch.equal(images3, images) and torch.equal(targets3, targets) and meta3["image_space"] == space
    assert meta3["original_method"] == "mine" and meta3["lr"] == pytest.approx(0.02)
    assert not list(tmp_path.glob(".*tmp")) and not list(tmp_path.glob(".*old"))


def test_load_distilled_dataset(tmp_path):
    src = tmp_path / "mine.safetensors"
    images, targets, std = _set(src, "normalized")
    data = ssdd.load_distilled(src)
    assert isinstance(data, torch.utils.data.Dataset) and len(data) == 7
    for i in range(7):
        x, t = data[i]
        assert torch.equal(x, images[i]) and torch.equal(t, targets[i]) and x.dtype == t.dtype == torch.float32
    assert data.image_space == "normalized" and data.std == std and data.mean == [0.4, 0.5, 0.6]
    assert data.objective == "mse" and data.lr == pytest.approx(0.02) and data.meta["method"] == "mine"
    assert data.pixels().min() >= 0 and data.pixels().max() <= 1
    x, t = next(iter(torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)))
    assert x.shape == (4, 3, 8, 8) and t.shape == (4, 5)


def test_import_ssdd_stays_cheap():
    """``ssdd.load_distilled`` is resolved on first use, so ``import ssdd`` does not pull in torch."""
    subprocess.run([sys.executable, "-c", "import sys, ssdd; assert 'torch' not in sys.modules"], check=True)


@pytest.mark.parametrize("case", ["missing", "unknown_format", "wrong_shape", "counts", "npz_no_images",
                                  "integer_rows_not_one_hot", "out_is_folder", "export_unknown"])
def test_bad_input_is_one_line(tmp_path, capsys, case):
    krr = tmp_path / "krr"
    krr_st_files(krr)
    out = tmp_path / "o.safetensors"
    args, needle = {
        "missing": (["import", krr / "x_syn.pt", tmp_path / "nope" / "y_syn.pt", "--format", "krr_st"], "nope"),
        "unknown_format": (["import", krr, "--format", "frepo"], "unknown --format 'frepo'"),
        "wrong_shape": (["import", krr / "x_syn.pt", krr / "y_syn_bad.pt", "--format", "krr_st"], "targets must be"),
        "counts": (["import", krr / "x_syn.pt", krr / "y_syn_short.pt", "--format", "krr_st"], "12 images but 5 targets"),
        "npz_no_images": (["import", tmp_path / "a.npz", "--format", "npz"], "no image array"),
        "integer_rows_not_one_hot": (["import", tmp_path / "b.npz", "--format", "npz"], "one-hot"),
        "out_is_folder": (["import", krr, "--format", "krr_st"], "is a folder"),
        "export_unknown": (["export", out, "--format", "tfrecord"], "unknown --format 'tfrecord'"),
    }[case]
    torch.save(torch.zeros(12, 4, 2), krr / "y_syn_bad.pt")
    torch.save(torch.zeros(5, 4), krr / "y_syn_short.pt")
    np.savez(tmp_path / "a.npz", targets=np.zeros((3, 2)))
    np.savez(tmp_path / "b.npz", images=np.zeros((3, 1, 4, 4), np.float32), targets=np.full((3, 2), 2, np.int64))
    save_arrays(out, torch.zeros(2, 1, 4, 4), torch.zeros(2, 3), {"method": "m"})
    target = tmp_path if case == "out_is_folder" else tmp_path / "new.safetensors"
    code, lines = run_cli([*args, "--out", target], capsys)
    assert_one_line_error(code, lines, needle)
    assert not (tmp_path / "new.safetensors").exists() and not list(tmp_path.glob(".*.tmp"))
