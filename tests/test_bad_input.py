"""Bad input, driven through the CLI in-process: every user mistake must end with exactly one
``ssdd: error:`` line naming the file or option at fault, exit code 2, no traceback, and no new
artifact (result file or ``.*.tmp``) left behind by the failing command.

Everything runs on tiny data (a few dozen 16x16 images, one-epoch teachers, two distillation
steps), so each case takes well under two seconds."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssdd import artifacts
from ssdd.artifacts import save_encoder, save_tensors
from ssdd.distilled_set import save_arrays
from ssdd.cli import main
from ssdd.data import ImageSet, save_dataset
from ssdd.models import build

import ssdd.run  # noqa: E402,F401  (import cost paid at collection, not in the first case)


ARTIFACT_SUFFIXES = (".safetensors", ".json", ".csv", ".md", ".png", ".pt")


# ---- helpers ------------------------------------------------------------------------------

def files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def new_artifacts(before: set[Path], root: Path) -> list[Path]:
    """Files the command created that look like results or temp files."""
    return sorted(p for p in files(root) - before
                  if p.suffix in ARTIFACT_SUFFIXES or (p.name.startswith(".") and p.name.endswith(".tmp")))


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.strip() and not line.startswith("[ssdd]")]


def expect_error(args, capsys, root: Path, *needles: str, any_of: tuple[str, ...] = ()) -> str:
    """Run ``ssdd ARGS`` in-process and check the contract; returns the error line."""
    before = files(root)
    code = main([str(a) for a in args])
    lines = error_lines(capsys)
    assert code == 2, f"exit code {code}, stderr {lines}"
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("ssdd: error:"), line
    assert "Traceback" not in line
    for needle in needles:
        assert str(needle) in line, (needle, line)
    if any_of:
        assert any(n in line for n in any_of), (any_of, line)
    leftover = new_artifacts(before, root)
    assert not leftover, f"left behind: {[str(p.relative_to(root)) for p in leftover]}"
    return line


def images(n: int = 40, channels: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen)


def write_set(path: Path, n: int = 40, channels: int = 1, size: int = 16, labels: bool = True) -> Path:
    y = torch.arange(n) % 4 if labels else None
    save_dataset(path, ImageSet(images(n, channels, size), y, ["a", "b", "c", "d"] if labels else [], "tiny"))
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def tiny_encoder(path: Path, channels: int = 1, widths=(8, 8), size: int = 16) -> Path:
    spec = {"arch": "convnet", "in_channels": channels, "image_size": size, "out_dim": 0, "widths": list(widths),
            "pool": "gap"}
    torch.manual_seed(0)
    save_encoder(path, build(spec), spec, {"method": "tiny"})
    return path


def tiny_npz(path: Path, n: int = 24, channels: int = 3, size: int = 16, labels: bool = True) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"x": rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)}
    if labels:
        arrays["y"] = np.arange(n) % 3
    np.savez(path, **arrays)
    return path


def tiny_args(src: Path, tgt: Path) -> list[str]:
    pairs = ["data.size=16", f"data.source={src}", f'data.targets=["{tgt}"]', "data.heldout=8",
             "teacher.epochs=1", "teacher.batch=16", "teacher.projector=[16, 16]", "teacher.model.widths=[8, 8]",
             "model.widths=[8, 8]", "distill.m=5", "distill.krr_st.steps=2", "distill.batch=8", "distill.krr_st.pool_size=2",
             "distill.krr_st.pool_max_age=2", "distill.krr_st.check_models=1", "distill.krr_st.check_batches=1", "pretrain.epochs=1",
             "pretrain.batch=8", "evaluate.seeds=1", "evaluate.finetune_iters=2", "evaluate.finetune_batch=8",
             "evaluate.linear_draws=1", "evaluate.finetune_fractions=[1.0]", "evaluate.linear_fractions=[1.0]"]
    return ["--no-progress"] + [x for pair in pairs for x in ("--set", pair)]


TINY_EVAL = ["--no-progress", "--set", "model.widths=[8, 8]", "--set", "data.size=16", "--set", "evaluate.seeds=1",
             "--set", "evaluate.finetune_iters=2", "--set", "evaluate.finetune_batch=8",
             "--set", "evaluate.linear_draws=1", "--protocols", "linear"]
TINY_PRETRAIN = ["--no-progress", "--set", "model.widths=[8, 8]", "--set", "pretrain.epochs=1",
                 "--set", "evaluate.seeds=1"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny run folder with `prepare` and `teacher` done (1-channel 16x16 source)."""
    root = tmp_path_factory.mktemp("bad_input_base")
    src, tgt = write_set(root / "src.safetensors"), write_set(root / "tgt.safetensors")
    out = root / "run"
    assert main(["run", "--out", str(out), "--until", "teacher", *tiny_args(src, tgt)]) == 0
    return out, tiny_args(src, tgt)


@pytest.fixture
def run_copy(base_run, tmp_path):
    base, args = base_run
    out = tmp_path / "run"
    shutil.copytree(base, out)
    return out, args


@pytest.fixture
def data(tmp_path):
    """A tiny labelled source and target dataset file in tmp_path."""
    return write_set(tmp_path / "src.safetensors"), write_set(tmp_path / "tgt.safetensors")


# ---- missing files, one per input kind --------------------------------------------------------

def test_missing_source_file(tmp_path, capsys, data):
    _, tgt = data
    missing = tmp_path / "nosuch.npz"
    expect_error(["prepare", "--out", tmp_path / "o", *tiny_args(f"npz:{missing}", tgt)], capsys, tmp_path,
                 str(missing))


def test_missing_source_for_prepare_source(tmp_path, capsys):
    missing = tmp_path / "nosuch.npz"
    expect_error(["prepare", missing, "--format", "npz", "--out", tmp_path / "d.safetensors"], capsys, tmp_path,
                 str(missing))


def test_unknown_bundled_source(tmp_path, capsys, data):
    _, tgt = data
    expect_error(["prepare", "--out", tmp_path / "o", *tiny_args("mnist6k", tgt)], capsys, tmp_path, "mnist6k")


def test_missing_target_file(tmp_path, capsys, data):
    src, _ = data
    missing = tmp_path / "nosuch_target.safetensors"
    expect_error(["prepare", "--out", tmp_path / "o", *tiny_args(src, missing)], capsys, tmp_path, str(missing))


def test_missing_teacher_file(run_copy, tmp_path, capsys):
    out, args = run_copy
    missing = tmp_path / "nosuch_teacher.pt"
    expect_error(["distill", "--out", out, "--teacher", missing, *args], capsys, tmp_path, str(missing))


def test_missing_teacher_file_is_found_before_any_stage_runs(tmp_path, capsys, data):
    """A fresh --out: the missing --teacher must be reported before `prepare` writes data files."""
    missing = tmp_path / "nosuch_teacher.pt"
    expect_error(["distill", "--out", tmp_path / "o", "--teacher", missing, *tiny_args(*data)], capsys, tmp_path,
                 str(missing))


def test_missing_upstream_teacher_artifact(run_copy, tmp_path, capsys):
    out, args = run_copy
    (out / "teacher.safetensors").unlink()
    expect_error(["distill", "--out", out, *args], capsys, tmp_path, str(out / "teacher.safetensors"))


def test_missing_distilled_set(tmp_path, capsys):
    missing = tmp_path / "nosuch_distilled.safetensors"
    expect_error(["pretrain", "--distilled", missing, "--out", tmp_path / "o", *TINY_PRETRAIN], capsys, tmp_path,
                 str(missing))


def test_missing_encoder(tmp_path, capsys):
    tgt = write_set(tmp_path / "tgt.safetensors")
    missing = tmp_path / "nosuch_encoder.safetensors"
    expect_error(["evaluate", "--encoder", missing, "--targets", tgt, "--out", tmp_path / "o", *TINY_EVAL], capsys,
                 tmp_path, str(missing))


def test_missing_evaluate_target(tmp_path, capsys):
    enc = tiny_encoder(tmp_path / "enc.safetensors")
    missing = tmp_path / "nosuch.npz"
    expect_error(["evaluate", "--encoder", enc, "--targets", missing, "--out", tmp_path / "o", *TINY_EVAL], capsys,
                 tmp_path, str(missing))


def test_info_missing_file(tmp_path, capsys):
    missing = tmp_path / "nosuch.safetensors"
    expect_error(["info", missing], capsys, tmp_path, str(missing))


def test_info_on_a_folder(tmp_path, capsys):
    expect_error(["info", tmp_path], capsys, tmp_path, str(tmp_path))


def test_missing_preset_file(tmp_path, capsys):
    missing = tmp_path / "nosuch.toml"
    expect_error(["run", "--preset", missing, "--out", tmp_path / "o"], capsys, tmp_path, str(missing))


# ---- truncated / corrupted files --------------------------------------------------------------

def test_truncated_source_safetensors(tmp_path, capsys, data):
    src, tgt = data
    truncate(src)
    expect_error(["prepare", "--out", tmp_path / "o", *tiny_args(src, tgt)], capsys, tmp_path, str(src))


def test_corrupted_safetensors_header(tmp_path, capsys, data):
    src, tgt = data
    raw = bytearray(src.read_bytes())
    raw[8:40] = b"{" * 32  # header no longer JSON
    src.write_bytes(bytes(raw))
    expect_error(["prepare", "--out", tmp_path / "o", *tiny_args(src, tgt)], capsys, tmp_path, str(src))


def test_huge_header_length(tmp_path, capsys):
    bad = tmp_path / "huge.safetensors"
    bad.write_bytes((2 ** 62).to_bytes(8, "little") + b"{}")
    expect_error(["info", bad], capsys, tmp_path, str(bad))


def test_info_truncated_file(tmp_path, capsys):
    f = truncate(write_set(tmp_path / "d.safetensors"), 0.3)
    expect_error(["info", f], capsys, tmp_path, str(f))


def test_truncated_distilled_set(tmp_path, capsys):
    f = tmp_path / "distilled.safetensors"
    save_arrays(f, torch.randn(5, 1, 16, 16), torch.randn(5, 8), {"method": "krr_st"})
    truncate(f)
    expect_error(["pretrain", "--distilled", f, "--out", tmp_path / "o", *TINY_PRETRAIN], capsys, tmp_path, str(f))


def test_truncated_encoder(tmp_path, capsys):
    enc = truncate(tiny_encoder(tmp_path / "enc.safetensors"))
    tgt = write_set(tmp_path / "tgt.safetensors")
    expect_error(["evaluate", "--encoder", enc, "--targets", tgt, "--out", tmp_path / "o", *TINY_EVAL], capsys,
                 tmp_path, str(enc))


def test_truncated_teacher_safetensors(run_copy, tmp_path, capsys):
    out, args = run_copy
    teacher = truncate(tiny_encoder(tmp_path / "teacher.safetensors"))
    expect_error(["distill", "--out", out, "--teacher", teacher, *args], capsys, tmp_path, str(teacher))


def test_garbage_teacher_checkpoint(run_copy, tmp_path, capsys):
    out, args = run_copy
    teacher = tmp_path / "garbage.pt"
    teacher.write_bytes(b"PK\x03\x04 definitely not a checkpoint" * 20)
    expect_error(["distill", "--out", out, "--teacher", teacher, *args], capsys, tmp_path, str(teacher))


def test_corrupted_teacher_artifact_in_run_folder(run_copy, tmp_path, capsys):
    out, args = run_copy
    truncate(out / "teacher.safetensors", 0.4)
    expect_error(["distill", "--out", out, *args], capsys, tmp_path, str(out / "teacher.safetensors"))


def test_corrupted_prepared_source_in_run_folder(run_copy, tmp_path, capsys):
    out, args = run_copy
    path = out / "data" / "source_train.safetensors"
    truncate(path, 0.4)
    expect_error(["distill", "--out", out, *args], capsys, tmp_path, str(path))


def test_truncated_cifar_batch(tmp_path, capsys):
    folder = tmp_path / "cifar"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batch = {b"batch_label": b"x", b"labels": [0, 1], b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8)}
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    truncate(folder / "data_batch_3", 0.5)
    expect_error(["prepare", folder, "--format", "cifar10", "--out", tmp_path / "c.safetensors"], capsys, tmp_path,
                 "data_batch_3")


def test_invalid_preset_toml(tmp_path, capsys):
    preset = tmp_path / "bad.toml"
    preset.write_text("[distill\nm = 5\n")
    expect_error(["run", "--preset", preset, "--out", tmp_path / "o"], capsys, tmp_path, str(preset))


def test_preset_with_unknown_key(tmp_path, capsys):
    preset = tmp_path / "unknown.toml"
    preset.write_text("[distill]\nmm = 5\n")
    expect_error(["run", "--preset", preset, "--out", tmp_path / "o"], capsys, tmp_path, str(preset), "distill.mm")


def test_preset_with_wrong_type(tmp_path, capsys):
    preset = tmp_path / "typed.toml"
    preset.write_text("[distill]\nsteps = \"many\"\n")
    expect_error(["run", "--preset", preset, "--out", tmp_path / "o"], capsys, tmp_path, str(preset), "distill.krr_st.steps")


# ---- dataset files with the wrong content -------------------------------------------------

def test_dataset_with_wrong_image_size(tmp_path, capsys, data):
    _, tgt = data
    src = write_set(tmp_path / "small.safetensors", size=8)
    expect_error(["prepare", "--out", tmp_path / "o", *tiny_args(src, tgt)], capsys, tmp_path, str(src), "16x16")


def test_dataset_with_float_images(tmp_path, capsys, data):
    _, tgt = data
    src = tmp_path / "float.safetensors"
    save_tensors(src, {"images": torch.rand(10, 1, 16, 16)}, {"kind": "dataset", "name": "float"})
    expect_error(["prepare", "--out", tmp_path / "o", *tiny_args(src, tgt)], capsys, tmp_path, str(src), "uint8")


def test_dataset_with_3d_images(tmp_path, capsys, data):
    _, tgt = data
    src = tmp_path / "flat.safetensors"
    save_tensors(src, {"images": torch.zeros(10, 16, 16, dtype=torch.uint8)}, {"kind": "dataset", "name": "flat"})
    expect_error(["prepare", "--out", tmp_path / "o", *tiny_args(src, tgt)], capsys, tmp_path, str(src))


def test_dataset_with_label_count_mismatch(tmp_path, capsys, data):
    _, tgt = data
    src = tmp_path / "labels.safetensors"
    save_tensors(src, {"images": images(10), "labels": torch.zeros(3, dtype=torch.long)},
                 {"kind": "dataset", "name": "labels"})
    expect_error(["prepare", "--out", tmp_path / "o", *tiny_args(src, tgt)], capsys, tmp_path, str(src))


def test_empty_prepared_dataset_file(tmp_path, capsys, data):
    _, tgt = data
    src = tmp_path / "empty.safetensors"
    save_tensors(src, {"images": torch.zeros(0, 1, 16, 16, dtype=torch.uint8)}, {"kind": "dataset", "name": "empty"})
    expect_error(["prepare", "--out", tmp_path / "o", *tiny_args(src, tgt)], capsys, tmp_path, str(src))


def test_encoder_file_given_as_source(tmp_path, capsys, data):
    _, tgt = data
    enc = tiny_encoder(tmp_path / "enc.safetensors")
    expect_error(["prepare", "--out", tmp_path / "o", *tiny_args(enc, tgt)], capsys, tmp_path, str(enc))


def test_info_on_distilled_set(tmp_path, capsys):
    f = tmp_path / "distilled.safetensors"
    save_arrays(f, torch.randn(5, 1, 16, 16), torch.randn(5, 8), {"method": "krr_st"})
    expect_error(["info", f], capsys, tmp_path, str(f))


def test_info_on_dataset_with_float_images(tmp_path, capsys):
    f = tmp_path / "float.safetensors"
    save_tensors(f, {"images": torch.rand(4, 1, 8, 8)}, {"kind": "dataset", "name": "float"})
    expect_error(["info", f], capsys, tmp_path, str(f), "uint8")


def test_info_on_json_file(tmp_path, capsys):
    f = tmp_path / "results.json"
    f.write_text(json.dumps([{"a": 1}]))
    expect_error(["info", f], capsys, tmp_path, str(f))


def test_npz_with_zero_images(tmp_path, capsys):
    f = tmp_path / "empty.npz"
    np.savez(f, x=np.zeros((0, 16, 16), np.uint8))
    expect_error(["prepare", f, "--format", "npz", "--out", tmp_path / "d.safetensors"], capsys, tmp_path, str(f),
                 "no images")


def test_npz_with_zero_images_as_stage_source(tmp_path, capsys, data):
    _, tgt = data
    f = tmp_path / "empty.npz"
    np.savez(f, x=np.zeros((0, 16, 16), np.uint8))
    expect_error(["prepare", "--out", tmp_path / "o", *tiny_args(f"npz:{f}", tgt)], capsys, tmp_path, str(f))


def test_npz_with_five_channels(tmp_path, capsys):
    f = tmp_path / "five.npz"
    np.savez(f, x=np.zeros((4, 5, 16, 17), np.uint8))
    expect_error(["prepare", f, "--format", "npz", "--out", tmp_path / "d.safetensors"], capsys, tmp_path, str(f))


def test_npz_with_float_pixels(tmp_path, capsys):
    f = tmp_path / "floats.npz"
    np.savez(f, x=np.random.default_rng(0).random((4, 16, 16)) * 300)
    expect_error(["prepare", f, "--format", "npz", "--out", tmp_path / "d.safetensors"], capsys, tmp_path, str(f),
                 "uint8")


def test_npz_with_object_array(tmp_path, capsys):
    f = tmp_path / "objects.npz"
    np.savez(f, x=np.zeros((2, 4, 4, 3), np.uint8), y=np.array([0, "cat"], dtype=object))
    expect_error(["prepare", f, "--format", "npz", "--out", tmp_path / "d.safetensors"], capsys, tmp_path, str(f))


def test_class_folder_without_images(tmp_path, capsys):
    root = tmp_path / "folders"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "a" / "x.png")
    (root / "b").mkdir()
    (root / "b" / "notes.txt").write_text("nothing here")
    expect_error(["prepare", root, "--format", "imagefolder", "--size", "8", "--out", tmp_path / "d.safetensors"],
                 capsys, tmp_path, str(root / "b"), "no images")


def test_imagefolder_without_class_folders(tmp_path, capsys):
    root = tmp_path / "empty_root"
    root.mkdir()
    expect_error(["prepare", root, "--format", "imagefolder", "--out", tmp_path / "d.safetensors"], capsys, tmp_path,
                 str(root))


def test_unreadable_image(tmp_path, capsys):
    root = tmp_path / "folders"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "a" / "good.png")
    bad = root / "a" / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all" * 10)
    expect_error(["prepare", root, "--format", "imagefolder", "--size", "8", "--out", tmp_path / "d.safetensors"],
                 capsys, tmp_path, str(bad), "unreadable image")


def test_target_without_labels(tmp_path, capsys):
    enc = tiny_encoder(tmp_path / "enc.safetensors")
    tgt = tiny_npz(tmp_path / "unlabelled.npz", channels=1, labels=False)
    expect_error(["evaluate", "--encoder", enc, "--targets", tgt, "--out", tmp_path / "o", *TINY_EVAL], capsys,
                 tmp_path, str(tgt), "labels")


def test_target_of_unknown_format(tmp_path, capsys):
    enc = tiny_encoder(tmp_path / "enc.safetensors")
    tgt = tmp_path / "target.txt"
    tgt.write_text("hello")
    expect_error(["evaluate", "--encoder", enc, "--targets", tgt, "--out", tmp_path / "o", *TINY_EVAL], capsys,
                 tmp_path, str(tgt))


# ---- distilled sets and encoders with the wrong content -----------------------------------

def test_distilled_set_without_targets(tmp_path, capsys):
    f = write_set(tmp_path / "dataset.safetensors")  # a dataset file, not a distilled set
    expect_error(["pretrain", "--distilled", f, "--out", tmp_path / "o", *TINY_PRETRAIN], capsys, tmp_path, str(f),
                 "targets")


def test_distilled_set_with_wrong_shapes(tmp_path, capsys):
    f = tmp_path / "flat.safetensors"
    save_tensors(f, {"images": torch.randn(5, 16, 16), "targets": torch.randn(5, 8)}, {"kind": "distilled_set"})
    expect_error(["pretrain", "--distilled", f, "--out", tmp_path / "o", *TINY_PRETRAIN], capsys, tmp_path, str(f))


def test_distilled_set_with_nan(tmp_path, capsys):
    f = tmp_path / "nan.safetensors"
    x = torch.randn(5, 1, 16, 16)
    x[2, 0, 3, 3] = float("nan")
    save_arrays(f, x, torch.randn(5, 8), {"method": "krr_st"})
    expect_error(["pretrain", "--distilled", f, "--out", tmp_path / "o", *TINY_PRETRAIN], capsys, tmp_path, str(f),
                 "NaN")


def test_encoder_channels_do_not_fit_target(tmp_path, capsys):
    enc = tiny_encoder(tmp_path / "enc.safetensors", channels=1)
    tgt = tiny_npz(tmp_path / "rgb.npz", channels=3)
    expect_error(["evaluate", "--encoder", enc, "--targets", tgt, "--out", tmp_path / "o", *TINY_EVAL], capsys,
                 tmp_path, "rgb", "channels")


def test_targets_with_different_channels_for_no_pretrain(tmp_path, capsys):
    gray = tiny_npz(tmp_path / "gray.npz", channels=1)
    rgb = tiny_npz(tmp_path / "rgb.npz", channels=3)
    expect_error(["evaluate", "--encoder", "none", "--targets", gray, rgb, "--out", tmp_path / "o", *TINY_EVAL],
                 capsys, tmp_path, "rgb", "channels")


def test_dataset_file_given_as_encoder(tmp_path, capsys):
    f = write_set(tmp_path / "dataset.safetensors")
    expect_error(["evaluate", "--encoder", f, "--targets", f, "--out", tmp_path / "o", *TINY_EVAL], capsys, tmp_path,
                 str(f), "encoder")


def test_encoder_with_unknown_architecture(tmp_path, capsys):
    enc = tmp_path / "enc.safetensors"
    save_tensors(enc, {"w": torch.zeros(2)}, {"kind": "encoder", "model_spec": {"arch": "nosuch", "in_channels": 1,
                                                                                "image_size": 16, "out_dim": 0}})
    tgt = write_set(tmp_path / "tgt.safetensors")
    expect_error(["evaluate", "--encoder", enc, "--targets", tgt, "--out", tmp_path / "o", *TINY_EVAL], capsys,
                 tmp_path, str(enc), "nosuch")


def test_encoder_with_incomplete_model_spec(tmp_path, capsys):
    enc = tmp_path / "enc.safetensors"
    save_tensors(enc, {"w": torch.zeros(2)}, {"kind": "encoder", "model_spec": {"arch": "convnet"}})
    tgt = write_set(tmp_path / "tgt.safetensors")
    expect_error(["evaluate", "--encoder", enc, "--targets", tgt, "--out", tmp_path / "o", *TINY_EVAL], capsys,
                 tmp_path, str(enc))


def test_encoder_weights_of_the_wrong_shape(tmp_path, capsys):
    spec16 = {"arch": "convnet", "in_channels": 1, "image_size": 16, "out_dim": 0, "widths": [16, 16], "pool": "gap"}
    enc = tmp_path / "enc.safetensors"
    save_tensors(enc, build(spec16).state_dict(), {"kind": "encoder", "model_spec": {**spec16, "widths": [8, 8]}})
    tgt = write_set(tmp_path / "tgt.safetensors")
    expect_error(["evaluate", "--encoder", enc, "--targets", tgt, "--out", tmp_path / "o", *TINY_EVAL], capsys,
                 tmp_path, str(enc))


# ---- teachers that do not fit -------------------------------------------------------------

def test_teacher_with_wrong_input_channels(run_copy, tmp_path, capsys):
    out, args = run_copy  # the source has 1 channel
    teacher = tmp_path / "rgb_teacher.pt"
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    torch.jit.script(net).save(str(teacher))
    expect_error(["distill", "--out", out, "--teacher", teacher, *args], capsys, tmp_path, str(teacher), "1x16x16")


def test_encoder_teacher_with_wrong_input_channels(run_copy, tmp_path, capsys):
    out, args = run_copy
    teacher = tiny_encoder(tmp_path / "rgb_teacher.safetensors", channels=3)
    expect_error(["distill", "--out", out, "--teacher", teacher, *args], capsys, tmp_path, str(teacher))


def test_teacher_whose_output_is_not_a_vector(run_copy, tmp_path, capsys):
    out, args = run_copy
    teacher = tmp_path / "maps_teacher.pt"
    torch.jit.script(torch.nn.Conv2d(1, 4, 3)).save(str(teacher))
    expect_error(["distill", "--out", out, "--teacher", teacher, *args], capsys, tmp_path, str(teacher), "vectors")


def test_teacher_checkpoint_with_wrong_keys(run_copy, tmp_path, capsys):
    out, args = run_copy
    teacher = tmp_path / "wrong_keys.pt"
    torch.save({"conv9.weight": torch.zeros(3)}, teacher)
    expect_error(["distill", "--out", out, "--teacher", teacher, *args], capsys, tmp_path, str(teacher), "conv9.weight")


def test_teacher_state_dict_with_wrong_shapes(run_copy, tmp_path, capsys):
    out, args = run_copy  # config: teacher.model.widths=[8, 8]; the file holds widths [16, 16]
    teacher = tmp_path / "wide.safetensors"
    spec = {"arch": "convnet", "in_channels": 1, "image_size": 16, "out_dim": 0, "widths": [16, 16], "pool": "gap"}
    save_tensors(teacher, build(spec).state_dict(), {})
    expect_error(["distill", "--out", out, "--teacher", teacher, *args], capsys, tmp_path, str(teacher))


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_teacher_checkpoint(run_copy, tmp_path, capsys):
    out, args = run_copy
    marker = tmp_path / "pwned_teacher"
    teacher = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil(marker)}, teacher, pickle_module=pickle)
    expect_error(["distill", "--out", out, "--teacher", teacher, *args], capsys, tmp_path, str(teacher))
    assert not marker.exists()


def test_malicious_legacy_pickle_teacher(run_copy, tmp_path, capsys):
    out, args = run_copy
    marker = tmp_path / "pwned_legacy"
    teacher = tmp_path / "evil_legacy.pth"
    teacher.write_bytes(pickle.dumps(Evil(marker), protocol=2))
    expect_error(["distill", "--out", out, "--teacher", teacher, *args], capsys, tmp_path, str(teacher))
    assert not marker.exists()


def test_malicious_cifar_batch(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned_cifar"
    payload = {b"batch_label": b"x", b"labels": [0], b"data": Evil(marker)}
    (folder / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=2))
    expect_error(["prepare", folder, "--format", "cifar10", "--out", tmp_path / "c.safetensors"], capsys, tmp_path,
                 "data_batch_1", "refused")
    assert not marker.exists()


def test_malicious_cifar_batch_via_subprocess_call(tmp_path, capsys):
    folder = tmp_path / "cifar"
    folder.mkdir()
    marker = tmp_path / "pwned_cifar_sub"

    class EvilCall:
        def __reduce__(self):
            return subprocess.call, (["touch", str(marker)],)

    (folder / "data_batch_1").write_bytes(pickle.dumps({b"labels": [0], b"data": EvilCall()}, protocol=2))
    expect_error(["prepare", folder, "--format", "cifar10", "--out", tmp_path / "c.safetensors"], capsys, tmp_path,
                 "data_batch_1")
    assert not marker.exists()


# ---- unknown names and bad options --------------------------------------------------------

def test_unknown_preset(tmp_path, capsys):
    expect_error(["run", "--preset", "nosuch", "--out", tmp_path / "o"], capsys, tmp_path, "nosuch", "--preset")


def test_unknown_format(tmp_path, capsys):
    src = tiny_npz(tmp_path / "x.npz")
    expect_error(["prepare", src, "--format", "jpegs", "--out", tmp_path / "d.safetensors"], capsys, tmp_path,
                 "jpegs", any_of=("--format", "format"))


def test_unknown_split(tmp_path, capsys):
    src = tiny_npz(tmp_path / "x.npz")
    expect_error(["prepare", src, "--format", "npz", "--split", "dev", "--out", tmp_path / "d.safetensors"], capsys,
                 tmp_path, "dev", "split")


def test_unknown_set_key(tmp_path, capsys):
    expect_error(["run", "--out", tmp_path / "o", "--set", "distill.mm=5"], capsys, tmp_path, "distill.mm", "--set")


def test_set_without_equals(tmp_path, capsys):
    expect_error(["run", "--out", tmp_path / "o", "--set", "distill.m"], capsys, tmp_path, "--set", "distill.m")


def test_set_a_whole_section(tmp_path, capsys):
    expect_error(["run", "--out", tmp_path / "o", "--set", "distill=5"], capsys, tmp_path, "distill")


def test_unknown_choice_in_set(tmp_path, capsys):
    expect_error(["run", "--out", tmp_path / "o", "--set", "distill.krr_st.pool_reset=sometimes"], capsys, tmp_path,
                 "distill.krr_st.pool_reset", "sometimes")


def test_unknown_protocol_option(tmp_path, capsys):
    expect_error(["evaluate", "--out", tmp_path / "o", "--protocols", "bogus"], capsys, tmp_path, "--protocols",
                 "bogus")


def test_unknown_protocol_in_set(tmp_path, capsys):
    expect_error(["run", "--out", tmp_path / "o", "--set", 'evaluate.protocols=["linear", "bogus"]'], capsys,
                 tmp_path, "evaluate.protocols", "bogus")


def test_unknown_stage_for_until(tmp_path, capsys):
    expect_error(["run", "--out", tmp_path / "o", "--until", "nowhere"], capsys, tmp_path, "--until", "nowhere")


def test_unknown_command(tmp_path, capsys):
    expect_error(["frobnicate", "--out", tmp_path / "o"], capsys, tmp_path, "frobnicate")


def test_unknown_option(tmp_path, capsys):
    expect_error(["distill", "--out", tmp_path / "o", "--bogus"], capsys, tmp_path, "--bogus")


def test_missing_out_option(tmp_path, capsys):
    expect_error(["distill"], capsys, tmp_path, "--out")


def test_empty_target_list(tmp_path, capsys):
    expect_error(["run", "--out", tmp_path / "o", "--set", "data.targets=[]"], capsys, tmp_path, "data.targets")


def test_unknown_device(tmp_path, capsys, data):
    expect_error(["run", "--out", tmp_path / "o", "--until", "prepare", "--device", "bogus", *tiny_args(*data)],
                 capsys, tmp_path, "--device", "bogus")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda(tmp_path, capsys, data):
    expect_error(["run", "--out", tmp_path / "o", "--until", "prepare", "--device", "cuda", *tiny_args(*data)],
                 capsys, tmp_path, "--device", "cuda")


# ---- wrong types in --set / options -----------------------------------------------------------

@pytest.mark.parametrize("pair,key", [
    ("distill.krr_st.steps=abc", "distill.krr_st.steps"),
    ("distill.m=1.5", "distill.m"),
    ("distill.flip=1", "distill.flip"),
    ("distill.krr_st.lr_images=fast", "distill.krr_st.lr_images"),
    ("data.targets=digits", "data.targets"),
    ("model.widths=[8, \"wide\"]", "model.widths"),
    ("seed=true", "seed"),
])
def test_wrong_type_in_set(tmp_path, capsys, pair, key):
    expect_error(["run", "--out", tmp_path / "o", "--set", pair], capsys, tmp_path, key)


@pytest.mark.parametrize("args,option", [
    (["evaluate", "--seeds", "abc"], "--seeds"),
    (["evaluate", "--label-fractions", "half"], "--label-fractions"),
    (["prepare", "SRC", "--format", "npz", "--size", "big"], "--size"),
    (["prepare", "SRC", "--format", "npz", "--max-per-class", "1.5"], "--max-per-class"),
])
def test_wrong_type_in_option(tmp_path, capsys, args, option):
    src = str(tiny_npz(tmp_path / "x.npz"))
    args = [src if a == "SRC" else a for a in args]
    out = tmp_path / ("d.safetensors" if args[0] == "prepare" else "o")
    expect_error([*args, "--out", out], capsys, tmp_path, option)


# ---- non-positive sizes, steps, m, seeds ------------------------------------------------------

@pytest.mark.parametrize("pair,key", [
    ("distill.m=0", "distill.m"),
    ("distill.krr_st.steps=0", "distill.krr_st.steps"),
    ("distill.krr_st.steps=-3", "distill.krr_st.steps"),
    ("distill.batch=0", "distill.batch"),
    ("teacher.epochs=0", "teacher.epochs"),
    ("pretrain.batch=-1", "pretrain.batch"),
    ("data.size=0", "data.size"),
    ("evaluate.seeds=0", "evaluate.seeds"),
])
def test_non_positive_in_set(tmp_path, capsys, pair, key):
    expect_error(["run", "--out", tmp_path / "o", "--set", pair], capsys, tmp_path, key, "positive")


@pytest.mark.parametrize("size", ["0", "-4"])
def test_non_positive_prepare_size(tmp_path, capsys, size):
    src = tiny_npz(tmp_path / "x.npz")
    expect_error(["prepare", src, "--format", "npz", "--size", size, "--out", tmp_path / "d.safetensors"], capsys,
                 tmp_path, "--size")


def test_non_positive_max_per_class(tmp_path, capsys):
    src = tiny_npz(tmp_path / "x.npz")
    expect_error(["prepare", src, "--format", "npz", "--max-per-class", "0", "--out", tmp_path / "d.safetensors"],
                 capsys, tmp_path, any_of=("--max-per-class", "max_per_class"))


def test_zero_seeds_option(tmp_path, capsys):
    enc = tiny_encoder(tmp_path / "enc.safetensors")
    tgt = write_set(tmp_path / "tgt.safetensors")
    expect_error(["evaluate", "--encoder", enc, "--targets", tgt, "--seeds", "0", "--out", tmp_path / "o"], capsys,
                 tmp_path, any_of=("--seeds", "evaluate.seeds"))


def test_negative_seed(tmp_path, capsys):
    tgt = write_set(tmp_path / "tgt.safetensors")
    expect_error(["evaluate", "--encoder", "none", "--targets", tgt, "--label-fractions", "0.5", "--set", "seed=-1",
                  "--out", tmp_path / "o", *TINY_EVAL], capsys, tmp_path, "seed")


def test_negative_heldout(tmp_path, capsys, data):
    expect_error(["run", "--until", "prepare", "--out", tmp_path / "o", *tiny_args(*data), "--set", "data.heldout=-1"],
                 capsys, tmp_path, "data.heldout")


def test_zero_heldout(tmp_path, capsys, data):
    expect_error(["run", "--until", "prepare", "--out", tmp_path / "o", *tiny_args(*data), "--set", "data.heldout=0"],
                 capsys, tmp_path, "data.heldout")


def test_heldout_as_large_as_the_source(tmp_path, capsys, data):
    expect_error(["run", "--until", "prepare", "--out", tmp_path / "o", *tiny_args(*data), "--set", "data.heldout=40"],
                 capsys, tmp_path, "data.heldout")


def test_negative_source_max_per_class(tmp_path, capsys):
    src = tiny_npz(tmp_path / "src.npz", channels=1)
    tgt = write_set(tmp_path / "tgt.safetensors")
    expect_error(["run", "--until", "prepare", "--out", tmp_path / "o", *tiny_args(f"npz:{src}", tgt),
                  "--set", "data.source_max_per_class=-1"], capsys, tmp_path, "data.source_max_per_class")


def test_zero_check_models(run_copy, tmp_path, capsys):
    out, args = run_copy
    expect_error(["distill", "--out", out, *args, "--set", "distill.krr_st.check_models=0"], capsys, tmp_path,
                 "distill.krr_st.check_models")


def test_zero_linear_draws(tmp_path, capsys):
    tgt = write_set(tmp_path / "tgt.safetensors")
    expect_error(["evaluate", "--encoder", "none", "--targets", tgt, "--out", tmp_path / "o", *TINY_EVAL,
                  "--label-fractions", "0.5", "--set", "evaluate.linear_draws=0"], capsys, tmp_path,
                 "evaluate.linear_draws")


def test_test_split_above_one(tmp_path, capsys):
    tgt = write_set(tmp_path / "tgt.safetensors")
    expect_error(["evaluate", "--encoder", "none", "--targets", tgt, "--out", tmp_path / "o", *TINY_EVAL,
                  "--set", "evaluate.test_split=1.5"], capsys, tmp_path, "evaluate.test_split")


def test_m_larger_than_the_source(run_copy, tmp_path, capsys):
    out, args = run_copy  # 32 training images after 8 held out
    expect_error(["distill", "--out", out, *args, "--set", "distill.m=100"], capsys, tmp_path, "distill.m=100")


# ---- label fractions, option combinations -----------------------------------------------------

@pytest.mark.parametrize("fraction", ["0", "1.5", "-0.1"])
def test_bad_label_fraction(tmp_path, capsys, fraction):
    enc = tiny_encoder(tmp_path / "enc.safetensors")
    tgt = write_set(tmp_path / "tgt.safetensors")
    expect_error(["evaluate", "--encoder", enc, "--targets", tgt, "--label-fractions", fraction,
                  "--out", tmp_path / "o"], capsys, tmp_path, any_of=("--label-fractions", "linear_fractions"))


def test_encoder_without_targets(tmp_path, capsys):
    enc = tiny_encoder(tmp_path / "enc.safetensors")
    expect_error(["evaluate", "--encoder", enc, "--out", tmp_path / "o"], capsys, tmp_path, "--targets", "--encoder")


def test_prepare_source_without_format(tmp_path, capsys):
    src = tiny_npz(tmp_path / "x.npz")
    expect_error(["prepare", src, "--out", tmp_path / "d.safetensors"], capsys, tmp_path, "--format")


# ---- output paths -----------------------------------------------------------------------

def test_stage_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    expect_error(["distill", "--out", f], capsys, tmp_path, str(f), "is a file")


def test_stage_data_folder_is_a_file(tmp_path, capsys, data):
    out = tmp_path / "o"
    out.mkdir()
    (out / "data").write_text("in the way")
    expect_error(["run", "--until", "prepare", "--out", out, *tiny_args(*data)], capsys, tmp_path, str(out / "data"))


def test_prepare_source_out_is_a_folder(tmp_path, capsys):
    src = tiny_npz(tmp_path / "x.npz")
    folder = tmp_path / "outdir"
    folder.mkdir()
    expect_error(["prepare", src, "--format", "npz", "--out", folder], capsys, tmp_path, str(folder), "folder")


def test_prepare_source_out_parent_is_a_file(tmp_path, capsys):
    src = tiny_npz(tmp_path / "x.npz")
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    expect_error(["prepare", src, "--format", "npz", "--out", blocker / "d.safetensors"], capsys, tmp_path,
                 str(blocker))


def test_pretrain_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "distilled.safetensors"
    save_arrays(f, torch.randn(5, 1, 16, 16), torch.randn(5, 8), {"method": "krr_st"})
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    expect_error(["pretrain", "--distilled", f, "--out", blocker, *TINY_PRETRAIN], capsys, tmp_path, str(blocker))


# ---- no permission, disk full -------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions (see the monkeypatched case)")
def test_read_only_output_folder_chmod(tmp_path, capsys):
    src = tiny_npz(tmp_path / "x.npz")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        expect_error(["prepare", src, "--format", "npz", "--out", folder / "d.safetensors"], capsys, tmp_path,
                     str(folder), "permission")
    finally:
        folder.chmod(0o700)


def _no_permission(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")


def test_no_write_permission_prepare_source(tmp_path, capsys, monkeypatch):
    src = tiny_npz(tmp_path / "x.npz")
    folder = tmp_path / "ro"
    folder.mkdir()
    monkeypatch.setattr(artifacts.tempfile, "mkstemp", _no_permission)
    expect_error(["prepare", src, "--format", "npz", "--out", folder / "d.safetensors"], capsys, tmp_path,
                 str(folder), "permission")


def test_no_write_permission_stage(tmp_path, capsys, monkeypatch, data):
    monkeypatch.setattr(artifacts.tempfile, "mkstemp", _no_permission)
    out = tmp_path / "o"
    expect_error(["run", "--until", "prepare", "--out", out, *tiny_args(*data)], capsys, tmp_path, str(out),
                 "permission")


def test_read_only_file_system(tmp_path, capsys, monkeypatch):
    src = tiny_npz(tmp_path / "x.npz")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(artifacts.tempfile, "mkstemp", read_only)
    out = tmp_path / "d.safetensors"
    expect_error(["prepare", src, "--format", "npz", "--out", out], capsys, tmp_path, str(out))


def test_disk_full_during_write(tmp_path, capsys, monkeypatch):
    src = tiny_npz(tmp_path / "x.npz")
    real_write_bytes = Path.write_bytes

    def half_then_full(self, data):
        real_write_bytes(self, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    out = tmp_path / "d.safetensors"
    expect_error(["prepare", src, "--format", "npz", "--out", out], capsys, tmp_path, str(out), "No space left")
    assert not out.exists()


def test_disk_full_on_rename(tmp_path, capsys, monkeypatch):
    src = tiny_npz(tmp_path / "x.npz")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts.os, "replace", full)
    out = tmp_path / "d.safetensors"
    expect_error(["prepare", src, "--format", "npz", "--out", out], capsys, tmp_path, str(out), "No space left")
    assert not out.exists()


def test_disk_full_on_fsync(tmp_path, capsys, monkeypatch):
    src = tiny_npz(tmp_path / "x.npz")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts.os, "fsync", full)
    out = tmp_path / "d.safetensors"
    expect_error(["prepare", src, "--format", "npz", "--out", out], capsys, tmp_path, str(out), "No space left")
    assert not out.exists()


def test_disk_full_midway_through_a_stage(tmp_path, capsys, monkeypatch, data):
    """The prepare stage writes several files: the second failing must not leave the first behind."""
    real_replace, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", second_fails)
    out = tmp_path / "o"
    expect_error(["run", "--until", "prepare", "--out", out, *tiny_args(*data)], capsys, tmp_path, str(out),
                 "No space left")


# ---- more option combinations and upstream files ------------------------------------------------

def test_targets_without_encoder(tmp_path, capsys):
    """--targets only means something with --encoder; silently running the stage instead hides the mistake."""
    tgt = write_set(tmp_path / "tgt.safetensors")
    expect_error(["evaluate", "--targets", tgt, "--out", tmp_path / "o"], capsys, tmp_path, "--targets", "--encoder")


def test_report_without_results(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    expect_error(["report", "--out", out], capsys, tmp_path, "results.json")


def test_pretrain_stage_without_distilled_set(run_copy, tmp_path, capsys):
    out, args = run_copy
    expect_error(["pretrain", "--out", out, *args], capsys, tmp_path, str(out / "distilled" / "krr_st.safetensors"))


# ---- labels in a prepared target that do not fit ------------------------------------------------

def _target_with_labels(path: Path, labels: torch.Tensor) -> Path:
    save_tensors(path, {"images": images(len(labels)), "labels": labels},
                 {"kind": "dataset", "name": "odd", "class_names": ["a", "b", "c", "d"]})
    return path


def test_target_with_float_labels(tmp_path, capsys):
    tgt = _target_with_labels(tmp_path / "float_labels.safetensors", (torch.arange(24) % 4).float())
    expect_error(["evaluate", "--encoder", "none", "--targets", tgt, "--out", tmp_path / "o", *TINY_EVAL,
                  "--protocols", "finetune", "--set", "evaluate.finetune_fractions=[1.0]"], capsys, tmp_path,
                 str(tgt), "labels")


def test_target_with_labels_beyond_class_names(tmp_path, capsys):
    tgt = _target_with_labels(tmp_path / "big_labels.safetensors", torch.arange(24) % 7)  # 4 class names
    expect_error(["evaluate", "--encoder", "none", "--targets", tgt, "--out", tmp_path / "o", *TINY_EVAL,
                  "--protocols", "finetune", "--set", "evaluate.finetune_fractions=[1.0]"], capsys, tmp_path,
                 str(tgt), "label")
