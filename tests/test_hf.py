"""Hugging Face datasets in (format ``hf``: save_to_disk folders, parquet folders and globs) and out
(``ssdd export --format hf`` / ``ssdd import --format hf``). Every dataset is built here with the
``datasets`` library itself; pixels must come back exactly at native size."""

import atexit
import io
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

if "HF_DATASETS_CACHE" not in os.environ:  # streaming leaves lock files there: not in the home folder
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="ssdd-test-hf-cache-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

datasets = pytest.importorskip("datasets")

from ssdd.cli import main  # noqa: E402
from ssdd.data import load_dataset  # noqa: E402
from ssdd.data.formats import dataset_info, hf as hf_format, read_source  # noqa: E402
from ssdd.data.sources import has_own_test_split, load_source, load_target, parse_spec, target_name  # noqa: E402
from ssdd.distilled_set import load_arrays, save_arrays  # noqa: E402
from ssdd.errors import UserError  # noqa: E402

import test_cli_errors  # noqa: E402
from test_bad_input import tiny_args  # noqa: E402
from test_cli_errors import assert_one_line_error  # noqa: E402
from test_formats import raises_one_line  # noqa: E402

NAMES = ["cat", "dog", "emu"]


def run_cli(args, capsys):
    return test_cli_errors.run_cli([str(a) for a in args], capsys)


def pixels(seed, n, size=8, gray=False):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size) if gray else (n, size, size, 3), dtype=np.uint8)


def hf_split(seed, n, image="img", label="label", size=8, gray=False, class_label=True, classes=3):
    """A Dataset of PNG-encoded images and labels, and the arrays it was made from (N,C,H,W)."""
    x = pixels(seed, n, size, gray)
    y = np.random.default_rng(seed + 100).integers(0, classes, n)
    columns = {image: datasets.Image()}
    if label:
        columns[label] = datasets.ClassLabel(names=NAMES[:classes]) if class_label else datasets.Value("int64")
    data = {image: [Image.fromarray(a) for a in x]}
    if label:
        data[label] = y.tolist()
    ds = datasets.Dataset.from_dict(data, features=datasets.Features(columns))
    return ds, (x[:, None] if gray else x.transpose(0, 3, 1, 2)), y


def saved_dict(folder, **kw):
    """A DatasetDict (train 12, test 6) saved with save_to_disk; returns (folder, {split: (x, y)})."""
    train, xtr, ytr = hf_split(0, 12, **kw)
    test, xte, yte = hf_split(1, 6, **kw)
    datasets.disable_progress_bars()
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(folder))
    return folder, {"train": (xtr, ytr), "test": (xte, yte)}


def parquet_folder(folder, n_train=40, n_test=12, size=8, shards=2, **kw):
    """The Hub's layout: data/train-0000k-of-0000n.parquet (in shards) and data/test-00000-of-00001.parquet."""
    (folder / "data").mkdir(parents=True)
    datasets.disable_progress_bars()
    train, xtr, ytr = hf_split(0, n_train, size=size, **kw)
    for k in range(shards):
        shard = folder / "data" / f"train-{k:05d}-of-{shards:05d}.parquet"
        train.shard(shards, k, contiguous=True).to_parquet(str(shard))
    test, xte, yte = hf_split(1, n_test, size=size, **kw)
    test.to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    (folder / "README.md").write_text("not data\n")
    return folder, {"train": (xtr, ytr), "test": (xte, yte)}


# ---- in ----------------------------------------------------------------------------------------

def test_save_to_disk_splits_are_exact(tmp_path):
    root, raw = saved_dict(tmp_path / "ds")
    for split, own in (("train", "train"), ("test", "test"), ("val", "test")):
        data = read_source(str(root), "hf", 8, split)
        assert torch.equal(data.images, torch.from_numpy(raw[own][0])), split
        assert data.labels.tolist() == raw[own][1].tolist() and data.class_names == NAMES
    assert parse_spec(str(root)) == ("hf", str(root))  # a save_to_disk folder is recognised as such
    assert has_own_test_split(f"hf:{root}") and target_name(f"hf:{root}") == "ds"
    # one Dataset saved alone is one split: train only, so a target holds out a stratified part
    single, x, _ = hf_split(3, 9)
    single.save_to_disk(str(tmp_path / "one"))
    assert torch.equal(load_source(f"hf:{tmp_path / 'one'}", 8).images, torch.from_numpy(x))
    assert not has_own_test_split(f"hf:{tmp_path / 'one'}")


def test_parquet_folder_glob_and_file(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_format, "BATCH", 7)  # batches that straddle the two shards
    root, raw = parquet_folder(tmp_path / "pq")
    train, test = load_target(f"hf:{root}", 8, 0.5)  # its own test split, not a held-out part
    assert torch.equal(train.images, torch.from_numpy(raw["train"][0])) and len(test) == 12
    assert torch.equal(test.images, torch.from_numpy(raw["test"][0]))
    assert train.labels.tolist() == raw["train"][1].tolist() and train.class_names == NAMES
    glob = f"hf:{root}/data/train-*.parquet"  # a glob is one split
    assert torch.equal(load_source(glob, 8).images, train.images)
    assert not has_own_test_split(glob) and target_name(glob) == "data"
    one = root / "data" / "test-00000-of-00001.parquet"
    assert parse_spec(str(one))[0] == "hf" and torch.equal(load_source(str(one), 8).images, test.images)


def test_per_class_cap_streams_and_stops_early(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_format, "BATCH", 4)
    root, raw = parquet_folder(tmp_path / "pq", n_train=30, shards=3)
    x, y = raw["train"]
    data = load_source(f"hf:{root}", 8, max_per_class=2)
    keep = [i for i in range(len(y)) if (y[:i] == y[i]).sum() < 2]  # the first two of each class, in file order
    assert data.labels.tolist() == y[keep].tolist() and torch.equal(data.images, torch.from_numpy(x[keep]))
    unlabelled = load_source(f"hf[label=none]:{root}", 8, max_per_class=5)
    assert unlabelled.labels is None and torch.equal(unlabelled.images, torch.from_numpy(x[:5]))
    # once every class is full the stream stops: a later batch with a missing label is never read
    monkeypatch.setattr(hf_format, "BATCH", 3)
    labels = [0, 1, 2, 2, 1, 0, None, 1, 0]
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in pixels(9, 9)], "label": labels},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.ClassLabel(names=NAMES)}))
    ds.to_parquet(str(tmp_path / "holes.parquet"))
    assert load_source(f"hf:{tmp_path / 'holes.parquet'}", 8, max_per_class=2).labels.tolist() == labels[:6]
    with raises_one_line("a row has no label"):
        load_source(f"hf:{tmp_path / 'holes.parquet'}", 8, max_per_class=3)


def test_gray_resize_columns_and_int_labels(tmp_path):
    ds, x, y = hf_split(4, 10, image="picture", label="fine", size=12, gray=True, class_label=False)
    ds.save_to_disk(str(tmp_path / "g"))
    data = load_source(f"hf[image=picture,label=fine]:{tmp_path / 'g'}", 8)
    assert data.images.shape == (10, 1, 8, 8) and data.labels.tolist() == y.tolist()
    assert data.class_names == [str(i) for i in range(int(y.max()) + 1)]
    expected = [np.asarray(Image.fromarray(a[0]).resize((8, 8), Image.Resampling.BOX)) for a in x]
    assert torch.equal(data.images[:, 0], torch.from_numpy(np.stack(expected)))
    bigger = load_source(f"hf[image=picture]:{tmp_path / 'g'}", 16)  # enlarging: LANCZOS, as imagefolder
    assert bigger.images.shape == (10, 1, 16, 16) and bigger.labels is None  # no label/labels column: unlabelled


def test_parquet_without_hf_metadata(tmp_path):
    """A parquet file written by plain pyarrow/pandas: the image column is a {bytes, path} struct."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = pixels(10, 5)
    encoded = []
    for a in x:
        buffer = io.BytesIO()
        Image.fromarray(a).save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array(encoded, type=struct), "labels": pa.array([0, 1, 0, 1, 1])}),
                   str(tmp_path / "plain.parquet"))
    data = load_source(str(tmp_path / "plain.parquet"), 8)
    assert torch.equal(data.images, torch.from_numpy(x.transpose(0, 3, 1, 2)))
    assert data.labels.tolist() == [0, 1, 0, 1, 1]


def test_prepare_command(tmp_path, capsys):
    ds, x, y = hf_split(5, 8, image="photo", label="kind")
    ds.to_parquet(str(tmp_path / "s.parquet"))
    out = tmp_path / "s.safetensors"
    assert run_cli(["prepare", tmp_path / "s.parquet", "--format", "hf", "--size", 8, "--out", out,
                    "--image-column", "photo", "--label-column", "kind", "--no-progress"], capsys)[0] == 0
    data = load_dataset(out)
    assert torch.equal(data.images, torch.from_numpy(x)) and data.labels.tolist() == y.tolist()
    assert dataset_info(str(out))["class_names"] == NAMES
    code, lines = run_cli(["prepare", tmp_path / "s.parquet", "--format", "hf", "--size", 8, "--out", out], capsys)
    assert_one_line_error(code, lines, "no image column (image or img; columns: photo, kind)")


def bad_inputs(tmp_path):
    text = datasets.Dataset.from_dict({"image": ["a", "b"], "label": [0, 1]})
    text.save_to_disk(str(tmp_path / "text"))
    strings = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * 2, "label": ["x", "y"]},
                                         features=datasets.Features({"image": datasets.Image(),
                                                                     "label": datasets.Value("string")}))
    strings.save_to_disk(str(tmp_path / "strings"))
    empty, _, _ = hf_split(6, 3)
    datasets.DatasetDict(train=empty, test=empty.select([])).save_to_disk(str(tmp_path / "empty"))
    unlabelled, _, _ = hf_split(7, 6, label=None)
    unlabelled.save_to_disk(str(tmp_path / "nolabels"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    return {
        "missing column": (f"hf[image=picture]:{tmp_path / 'text'}", "no column 'picture' (columns: image, label)"),
        "not an image column": (f"hf:{tmp_path / 'text'}", "column 'image' is not an image column (it holds Value("),
        "string labels": (f"hf:{tmp_path / 'strings'}", "label column 'label' holds Value("),
        "bad option": (f"hf[imag=x]:{tmp_path / 'text'}", "hf options are image=COLUMN and label=COLUMN"),
        "open bracket": (f"hf[image=x:{tmp_path / 'text'}", "closed brackets"),
        "options elsewhere": (f"npz[image=x]:{tmp_path / 'a.npz'}", "apply to format hf only"),
        "no parquet": (f"hf:{tmp_path / 'notes'}", "neither a save_to_disk folder"),
        "no match": (f"hf:{tmp_path}/nothing-*.parquet", "matches no .parquet files"),
        "corrupt parquet": (f"hf:{tmp_path / 'junk.parquet'}", "junk.parquet (split train): unreadable (Parquet"),
    }, tmp_path


@pytest.mark.parametrize("case", ["missing column", "not an image column", "string labels", "bad option",
                                  "open bracket", "options elsewhere", "no parquet", "no match", "corrupt parquet"])
def test_bad_input_is_one_line(tmp_path, case):
    cases, _ = bad_inputs(tmp_path)
    spec, needle = cases[case]
    with raises_one_line(needle):
        load_source(spec, 8)


def test_empty_split_and_unlabelled_target_are_one_line(tmp_path):
    _, root = bad_inputs(tmp_path)
    with raises_one_line("(split test): the split is empty"):
        load_target(f"hf:{root / 'empty'}", 8, 0.3)
    with raises_one_line("has no labels (no label or labels column; name one with hf[label=COL]:PATH)"):
        load_target(f"hf:{root / 'nolabels'}", 8, 0.3)
    assert load_source(f"hf:{root / 'nolabels'}", 8).labels is None  # fine as a source


def test_without_datasets_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # what `import datasets` meets when it is not installed
    with raises_one_line("needs the optional `datasets` package: pip install 'ssdd[hf]'"):
        load_source(f"hf:{tmp_path}", 8)
    code, lines = run_cli(["export", tmp_path / "x.safetensors", "--format", "hf", "--out", tmp_path / "o"], capsys)
    assert code == 2  # the missing file is named first; the extra is asked for once a set is there
    src = tmp_path / "mine.safetensors"
    distilled_set(src, "reference")
    code, lines = run_cli(["export", src, "--format", "hf", "--out", tmp_path / "o"], capsys)
    assert_one_line_error(code, lines, "export --format hf needs the optional `datasets` package")


def test_run_with_parquet_source_and_target(tmp_path, capsys):
    root, raw = parquet_folder(tmp_path / "pq", n_train=40, n_test=12, size=16)
    spec = f"hf:{root}"
    out = tmp_path / "run"
    cheap = ["--set", 'methods=["random_subset"]', "--set", 'evaluate.protocols=["linear"]']  # the data is the point
    assert main(["run", "--preset", "demo", "--out", str(out), *tiny_args(spec, spec), *cheap]) == 0
    source = [load_dataset(out / "data" / f"source_{p}.safetensors") for p in ("train", "heldout")]
    assert sum(len(s) for s in source) == 40 and source[0].labels is None
    train = load_dataset(out / "data" / "target_pq_train.safetensors")
    test = load_dataset(out / "data" / "target_pq_test.safetensors")
    assert torch.equal(test.images, torch.from_numpy(raw["test"][0])) and len(train) == 40  # the dataset's own split
    assert train.class_names == NAMES
    rows = json.loads((out / "results.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert rows and all(r["target"] == "pq" for r in rows)


# ---- out and back ------------------------------------------------------------------------------

def distilled_set(path, space, channels=3, objective="mse"):
    gen = torch.Generator().manual_seed(2)
    unit = torch.rand(7, channels, 8, 8, generator=gen) * 1.1 - 0.05  # a little outside [0, 1], as after optimising
    mean, std = [0.4, 0.5, 0.6][:channels], [0.2, 0.25, 0.3][:channels]
    images = unit if space == "reference" else \
        (unit - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    targets = torch.randn(7, 5, generator=gen) if objective == "mse" else torch.zeros(7, 0)
    save_arrays(path, images, targets, {"method": "mine", "objective": objective, "lr": 0.02, "image_space": space,
                                        "mean": mean, "std": std, "fingerprint": "abc", "seed": 3,
                                        "model_spec": {"arch": "convnet", "in_channels": channels, "image_size": 8,
                                                       "widths": [8], "pool": "gap", "out_dim": 5}})
    return images, targets, unit


@pytest.mark.parametrize("space,channels,objective", [("normalized", 3, "mse"), ("reference", 1, "barlow_twins")])
def test_export_loads_with_datasets_and_imports_exactly(tmp_path, capsys, space, channels, objective):
    src = tmp_path / "mine.safetensors"
    images, targets, unit = distilled_set(src, space, channels, objective)
    folder = tmp_path / "mine_hf"
    assert run_cli(["export", src, "--format", "hf", "--out", folder], capsys)[0] == 0
    ds = datasets.load_from_disk(str(folder))
    assert len(ds) == 7 and isinstance(ds.features["image"], datasets.Image)
    assert ds.info.dataset_name == "mine"
    info = json.loads(ds.info.description)["ssdd"]
    assert info["lr"] == 0.02 and info["objective"] == objective and info["image_space"] == space
    assert info["meta"]["seed"] == 3 and "fingerprint" not in info["meta"]
    png = np.asarray(ds[3]["image"])
    expected = (unit[3].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(png.reshape(expected.shape), expected)  # the PNG: [0, 1] pixel space, clipped
    assert np.array_equal(np.asarray(ds.with_format("numpy")["targets"]).reshape(7, -1), targets.numpy())
    back = tmp_path / "back.safetensors"
    assert run_cli(["import", folder, "--format", "hf", "--out", back], capsys)[0] == 0
    images2, targets2, meta = load_arrays(back)
    assert torch.equal(images2, images) and torch.equal(targets2, targets)
    assert meta["image_space"] == space and meta["objective"] == objective and meta["lr"] == 0.02
    assert meta["mean"] == [0.4, 0.5, 0.6][:channels] and meta["std"] == [0.2, 0.25, 0.3][:channels]
    assert meta["model_spec"]["widths"] == [8] and meta["original_method"] == "mine"
    # an earlier export is replaced; a folder holding other things is not touched
    assert run_cli(["export", src, "--format", "hf", "--out", folder], capsys)[0] == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    code, lines = run_cli(["export", src, "--format", "hf", "--out", tmp_path / "other"], capsys)
    assert_one_line_error(code, lines, "not an earlier hf export")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep"
    assert not list(tmp_path.glob(".*tmp")) and not list(tmp_path.glob(".*old"))


def test_import_a_plain_labelled_dataset(tmp_path, capsys):
    """Any image dataset imports: pixel/255 images, class ids as one-hot cross-entropy targets."""
    ds, x, y = hf_split(8, 6)
    ds.to_parquet(str(tmp_path / "set.parquet"))
    out = tmp_path / "set.safetensors"
    assert run_cli(["import", tmp_path / "set.parquet", "--format", "hf", "--out", out], capsys)[0] == 0
    images, targets, meta = load_arrays(out)
    assert torch.equal(images, torch.from_numpy(x).float() / 255)
    assert torch.equal(targets.argmax(1), torch.from_numpy(y)) and targets.shape == (6, 3)
    assert meta["objective"] == "cross_entropy" and meta["image_space"] == "reference" and meta["class_names"] == NAMES
    code, lines = run_cli(["import", tmp_path / "nothing", "--format", "hf", "--out", out], capsys)
    assert_one_line_error(code, lines, "nothing: not found")


def test_import_reports_missing_image_column(tmp_path, capsys):
    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(str(tmp_path / "t"))
    code, lines = run_cli(["import", tmp_path / "t", "--format", "hf", "--out", tmp_path / "o.safetensors"], capsys)
    assert_one_line_error(code, lines, "no image column")


def test_import_refuses_a_non_image_column(tmp_path):
    datasets.Dataset.from_dict({"image": [1, 2]}).save_to_disk(str(tmp_path / "n"))
    from ssdd.interop import import_set
    with pytest.raises(UserError, match="not an image column"):
        import_set([tmp_path / "n"], "hf", tmp_path / "o.safetensors")
