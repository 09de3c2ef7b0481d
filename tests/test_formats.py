"""Dataset readers (ssdd.data.formats): faithful small files built here, plus the real data in
../shared/data when present. Pixels must round-trip exactly at native size."""

import io
import os
import pickle
import struct
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssdd.data.dataset import ImageSet, save_dataset
from ssdd.data.formats import FORMATS, dataset_info, read_source
from ssdd.errors import UserError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def raises_one_line(*needles):
    """Context manager: a UserError whose message is one line containing every needle."""
    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(UserError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            assert "\n" not in message and message.strip(), message
            for needle in needles:
                assert needle in message, (needle, message)
            return handled
    return Check()


# ---- CIFAR ------------------------------------------------------------------------------

def cifar_batch(rng, n, label_key=b"labels", classes=10, batch_label=b"training batch 1 of 5"):
    """A dict laid out like the official python-version batches (bytes keys, list labels)."""
    batch = {b"batch_label": batch_label, label_key: rng.integers(0, classes, n).tolist(),
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [f"img_{i:05d}.png".encode() for i in range(n)]}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [y // 5 for y in batch[label_key]]
    return batch


def write_pickle(path, obj, pickler=pickle.Pickler):
    with open(path, "wb") as fh:
        pickler(fh, protocol=2).dump(obj)


def make_cifar10(folder: Path, n=4, pickler=pickle.Pickler):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = cifar_batch(rng, n)
        write_pickle(folder / name, batches[name], pickler)
    write_pickle(folder / "batches.meta", {b"num_cases_per_batch": n, b"label_names": [s.encode() for s in CIFAR10_NAMES],
                                           b"num_vis": 3072}, pickler)
    return batches


def expected(batches, names):
    data = np.concatenate([batches[n][b"data"] for n in names])
    labels = np.concatenate([batches[n].get(b"labels", batches[n].get(b"fine_labels")) for n in names])
    return data, labels


def check_cifar(data: ImageSet, raw: np.ndarray, labels: np.ndarray, names):
    assert data.images.dtype == torch.uint8 and data.images.shape == (len(raw), 3, 32, 32)
    assert torch.equal(data.images, torch.from_numpy(raw.reshape(-1, 3, 32, 32)))
    # channel-major rows: 1024 R, then 1024 G, then 1024 B, each 32x32 row-major
    assert data.images[0, 0, 0, 1] == raw[0, 1] and data.images[0, 0, 1, 0] == raw[0, 32]
    assert data.images[0, 1, 0, 0] == raw[0, 1024] and data.images[0, 2, 31, 31] == raw[0, 3071]
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == labels.tolist()
    assert data.class_names == names


def test_cifar10_folder(tmp_path):
    batches = make_cifar10(tmp_path / "cifar-10-batches-py")
    train = read_source(str(tmp_path / "cifar-10-batches-py"), "cifar10", 32)
    check_cifar(train, *expected(batches, [f"data_batch_{i}" for i in range(1, 6)]), CIFAR10_NAMES)
    for split in ("test", "val"):
        check_cifar(read_source(str(tmp_path / "cifar-10-batches-py"), "cifar10", 32, split=split),
                    *expected(batches, ["test_batch"]), CIFAR10_NAMES)
    # the parent folder works too, and size/max_per_class apply
    small = read_source(str(tmp_path), "cifar10", 16, max_per_class=1)
    assert small.images.shape[1:] == (3, 16, 16) and len(small) == len(set(train.labels.tolist()))
    assert torch.bincount(small.labels).max() == 1


def test_cifar10_tar_gz(tmp_path):
    batches = make_cifar10(tmp_path / "src" / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    check_cifar(read_source(str(archive), "cifar10", 32), *expected(batches, [f"data_batch_{i}" for i in range(1, 6)]),
                CIFAR10_NAMES)
    check_cifar(read_source(str(archive), "cifar10", 32, "test"), *expected(batches, ["test_batch"]), CIFAR10_NAMES)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with raises_one_line("cut.tar.gz"):
        read_source(str(cut), "cifar10", 32)


class Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 str (BINSTRING) and numpy 1.x global names, like the
    official files (pickled by Python 2), so the reader is checked against that exact form."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin-1"))

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "").replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def test_cifar10_python2_pickles(tmp_path):
    batches = make_cifar10(tmp_path / "c", pickler=Py2Pickler)
    raw = (tmp_path / "c" / "data_batch_1").read_bytes()
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"_codecs" not in raw
    check_cifar(read_source(str(tmp_path / "c"), "cifar10", 32), *expected(batches, [f"data_batch_{i}" for i in range(1, 6)]),
                CIFAR10_NAMES)


def test_cifar100(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    batches = {"train": cifar_batch(rng, 7, b"fine_labels", 100), "test": cifar_batch(rng, 3, b"fine_labels", 100)}
    for name, batch in batches.items():
        write_pickle(folder / name, batch)
    names = [f"fine{i}" for i in range(100)]
    write_pickle(folder / "meta", {b"fine_label_names": [s.encode() for s in names],
                                   b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    check_cifar(read_source(str(tmp_path), "cifar100", 32), *expected(batches, ["train"]), names)
    check_cifar(read_source(str(folder), "cifar100", 32, "test"), *expected(batches, ["test"]), names)
    with raises_one_line("cifar100"):  # wrong format named: the message says which one fits
        read_source(str(folder / "train"), "cifar10", 32)


def test_cifar_truncated_batch(tmp_path):
    make_cifar10(tmp_path / "c")
    batch = tmp_path / "c" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:5000])
    with raises_one_line("data_batch_1", "truncated"):
        read_source(str(tmp_path / "c"), "cifar10", 32)


class Evil:
    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("how", ["os.system", "eval", "subprocess"])
def test_cifar_malicious_pickle_is_refused(tmp_path, how):
    make_cifar10(tmp_path / "c")
    marker = tmp_path / "pwned"
    payload = {"os.system": Evil(os.system, (f"touch {marker}",)),
               "eval": Evil(eval, (f"open({str(marker)!r}, 'w')",)),
               "subprocess": Evil(subprocess.call, (["touch", str(marker)],))}[how]
    write_pickle(tmp_path / "c" / "data_batch_1", {b"batch_label": b"x", b"labels": [0], b"data": payload})
    with raises_one_line("data_batch_1", "refused to unpickle", "(not a CIFAR batch)"):
        read_source(str(tmp_path / "c"), "cifar10", 32)
    assert not marker.exists()


# ---- image folders ----------------------------------------------------------------------

def save_image(path: Path, array: np.ndarray, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def test_imagefolder_png_jpeg_gray(tmp_path):
    rng = np.random.default_rng(2)
    pngs = {}
    for cls, count in (("cat", 3), ("dog", 2)):
        for i in range(count):
            pngs[(cls, i)] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            save_image(tmp_path / cls / f"{cls}_{i}.png", pngs[(cls, i)])
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    save_image(tmp_path / "dog" / "dog_9.PNG", gray)
    save_image(tmp_path / "bird" / "b0.JPEG", np.full((8, 8, 3), (200, 40, 90), np.uint8), "JPEG")
    save_image(tmp_path / "bird" / "b1.jpg", np.full((8, 8, 3), 30, np.uint8), "JPEG")
    (tmp_path / "bird" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()

    data = read_source(str(tmp_path), "imagefolder", 8)
    assert data.class_names == ["bird", "cat", "dog"]
    assert data.labels.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert data.images.shape == (8, 3, 8, 8)
    hwc = data.images.permute(0, 2, 3, 1).numpy()
    assert np.abs(hwc[0].astype(int) - (200, 40, 90)).max() <= 3  # JPEG is lossy
    for k, key in enumerate([("cat", 0), ("cat", 1), ("cat", 2), ("dog", 0), ("dog", 1)], start=2):
        assert np.array_equal(hwc[k], pngs[key])
    assert np.array_equal(hwc[7], np.repeat(gray[:, :, None], 3, axis=2))

    first = read_source(str(tmp_path), "imagefolder", 4, max_per_class=1)
    assert first.labels.tolist() == [0, 1, 2] and first.images.shape == (3, 3, 4, 4)
    box = pngs[("cat", 0)].astype(float).reshape(4, 2, 4, 2, 3).mean((1, 3))
    assert np.abs(first.images[1].permute(1, 2, 0).numpy() - box).max() <= 1  # BOX = 2x2 area mean
    assert read_source(str(tmp_path), "imagefolder", 20).images.shape == (8, 3, 20, 20)
    with raises_one_line(str(tmp_path), "train"):
        read_source(str(tmp_path), "imagefolder", 8, split="val")


def test_tiny_imagenet_raw_layout(tmp_path):
    colours = {"n001": (250, 10, 10), "n002": (10, 250, 10)}
    for wnid, colour in colours.items():
        for i in range(3):
            save_image(tmp_path / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", np.full((64, 64, 3), colour, np.uint8), "JPEG")
        (tmp_path / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t10\t10\n")
    annotations = [("val_0.JPEG", "n002"), ("val_1.JPEG", "n001"), ("val_2.JPEG", "n002")]
    for name, wnid in annotations:
        save_image(tmp_path / "val" / "images" / name, np.full((64, 64), 128 if wnid == "n001" else 20, np.uint8), "JPEG")
    (tmp_path / "val" / "val_annotations.txt").write_text("".join(f"{f}\t{w}\t0\t0\t63\t63\n" for f, w in annotations))
    save_image(tmp_path / "test" / "images" / "test_0.JPEG", np.zeros((64, 64, 3), np.uint8), "JPEG")
    (tmp_path / "wnids.txt").write_text("n002\nn001\n")
    (tmp_path / "words.txt").write_text("n000\tsomething\nn001\tgoldfish, Carassius auratus\nn002\tEuropean fire salamander, Salamandra\n")

    train = read_source(str(tmp_path), "imagefolder", 32)
    assert train.class_names == ["European fire salamander", "goldfish"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and train.images.shape == (6, 3, 32, 32)
    assert abs(train.images[0, 1].float().mean() - 250) < 4 and abs(train.images[3, 0].float().mean() - 250) < 4
    val = read_source(str(tmp_path), "imagefolder", 64, split="val")
    assert val.labels.tolist() == [0, 0, 1]  # class-major, then file name: val_0, val_2 | val_1
    assert abs(val.images[2].float().mean() - 128) < 3 and abs(val.images[0].float().mean() - 20) < 3
    assert read_source(str(tmp_path), "imagefolder", 64, split="val", max_per_class=1).labels.tolist() == [0, 1]
    test = read_source(str(tmp_path), "imagefolder", 16, split="test")  # no public labels
    assert test.labels is None and len(test) == 1 and test.num_classes == 2


def test_imagefolder_split_folders_without_wnids(tmp_path):
    for split, classes in (("train", ("a", "b", "c")), ("val", ("b", "c"))):
        for cls in classes:
            save_image(tmp_path / split / cls / "x.png", np.full((4, 4, 3), ord(cls), np.uint8))
    val = read_source(str(tmp_path), "imagefolder", 4, split="test")  # test maps to val/
    assert val.class_names == ["a", "b", "c"] and val.labels.tolist() == [1, 2]
    assert val.images[:, :, 0, 0].tolist() == [[98] * 3, [99] * 3]


def test_imagefolder_empty_class_folder(tmp_path):
    save_image(tmp_path / "a" / "x.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("no images here")
    with raises_one_line(str(tmp_path / "b"), "no images"):
        read_source(str(tmp_path), "imagefolder", 4)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_imagefolder_unreadable_image(tmp_path, damage):
    save_image(tmp_path / "a" / "good.jpg", np.zeros((4, 4, 3), np.uint8), "JPEG")
    bad = tmp_path / "a" / "bad.jpg"
    if damage == "garbage":
        bad.write_bytes(b"this is not an image at all" * 10)
    else:
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
        bad.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with raises_one_line(str(bad), "unreadable image"):
        read_source(str(tmp_path), "imagefolder", 4)


# ---- arrays ------------------------------------------------------------------------------

def test_imagenet64(tmp_path):
    rng = np.random.default_rng(3)
    files = {}
    for name, labels in (("train_data_batch_1", [1, 2, 1, 3]), ("train_data_batch_2", [3, 1, 2, 2]),
                         ("val_data", [2, 1, 3])):
        files[name] = (rng.integers(0, 256, (len(labels), 12288), dtype=np.uint8), np.array(labels))
        np.savez(tmp_path / f"{name}.npz", data=files[name][0], labels=files[name][1])
    train = read_source(str(tmp_path), "imagenet64", 64)
    raw = np.concatenate([files["train_data_batch_1"][0], files["train_data_batch_2"][0]])
    assert torch.equal(train.images, torch.from_numpy(raw.reshape(-1, 3, 64, 64)))
    assert train.images[0, 1, 0, 0] == raw[0, 4096] and train.images[0, 0, 1, 0] == raw[0, 64]
    assert train.labels.tolist() == [0, 1, 0, 2, 2, 0, 1, 1] and train.class_names == ["0", "1", "2"]
    val = read_source(str(tmp_path), "imagenet64", 32, split="val")
    assert val.images.shape == (3, 3, 32, 32) and val.labels.tolist() == [1, 0, 2]
    capped = read_source(str(tmp_path), "imagenet64", 64, max_per_class=1)  # capped across batches
    assert capped.labels.tolist() == [0, 1, 2]
    assert torch.equal(capped.images[2], train.images[3])
    single = read_source(str(tmp_path / "val_data.npz"), "imagenet64", 64)
    assert torch.equal(single.images, torch.from_numpy(files["val_data"][0].reshape(-1, 3, 64, 64)))


def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(4)
    hwc = rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "hwc.npz", x=hwc, y=np.array([0, 2, 1, 2, 0]), class_names=np.array(["a", "bb", "c"]))
    data = read_source(str(tmp_path / "hwc.npz"), "npz", 6)
    assert torch.equal(data.images, torch.from_numpy(hwc.transpose(0, 3, 1, 2)))
    assert data.labels.tolist() == [0, 2, 1, 2, 0] and data.class_names == ["a", "bb", "c"]
    assert read_source(str(tmp_path / "hwc.npz"), "npz", 6, max_per_class=1).labels.tolist() == [0, 2, 1]

    chw_train, chw_test = (rng.integers(0, 256, (n, 3, 5, 5), dtype=np.uint8) for n in (4, 2))
    np.savez(tmp_path / "chw.npz", x_train=chw_train, y_train=np.array([[1], [0], [1], [1]], np.uint8),
             x_test=chw_test, y_test=np.array([0, 1]))
    train = read_source(str(tmp_path / "chw.npz"), "npz", 5)
    assert torch.equal(train.images, torch.from_numpy(chw_train)) and train.labels.tolist() == [1, 0, 1, 1]
    assert train.labels.dtype == torch.int64 and train.class_names == ["0", "1"]
    test = read_source(str(tmp_path / "chw.npz"), "npz", 10, split="test")
    assert test.images.shape == (2, 3, 10, 10) and test.labels.tolist() == [0, 1]

    gray = rng.integers(0, 256, (3, 7, 7), dtype=np.uint8)
    np.savez(tmp_path / "gray.npz", x=gray)
    unlabelled = read_source(str(tmp_path / "gray.npz"), "npz", 7)
    assert torch.equal(unlabelled.images, torch.from_numpy(gray[:, None])) and unlabelled.labels is None
    with raises_one_line("gray.npz", "x_test"):
        read_source(str(tmp_path / "gray.npz"), "npz", 7, split="test")


def test_npz_object_array_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.zeros((2, 4, 4, 3), np.uint8), y=np.array([0, "cat"], dtype=object))
    with raises_one_line("obj.npz", "'y'", "Python objects"):
        read_source(str(tmp_path / "obj.npz"), "npz", 4)
    (tmp_path / "pickled.npz").write_bytes(pickle.dumps({"x": 1}))
    with raises_one_line("pickled.npz"):
        read_source(str(tmp_path / "pickled.npz"), "npz", 4)


def test_argument_errors(tmp_path):
    with raises_one_line("unknown 'jpegs'", ", ".join(FORMATS)):
        read_source(str(tmp_path), "jpegs", 32)
    with raises_one_line("missing.npz", "no such file"):
        read_source(str(tmp_path / "missing.npz"), "npz", 32)
    with raises_one_line("split", "'dev'"):
        read_source(str(tmp_path), "npz", 32, split="dev")
    with raises_one_line("max_per_class"):
        read_source(str(tmp_path), "npz", 32, max_per_class=0)


def test_bundled_and_dataset_info(tmp_path):
    pytest.importorskip("sklearn")
    digits = read_source("digits", "bundled", 16, max_per_class=3)
    assert len(digits) == 30 and digits.images.shape[1:] == (1, 16, 16) and digits.class_names == [str(i) for i in range(10)]
    save_dataset(tmp_path / "d.safetensors", digits)
    info = dataset_info(str(tmp_path / "d.safetensors"))
    mean, std = digits.mean_std()
    assert info == {"count": 30, "shape": [1, 16, 16], "num_classes": 10, "class_names": digits.class_names,
                    "has_labels": True, "mean": mean, "std": std}


# ---- real data (../shared/data) ----------------------------------------------------------

def test_real_cifar10_partial_npz(shared_data):
    path = str(shared_data / "cifar10-partial" / "cifar10_partial.npz")
    train = read_source(path, "npz", 32)
    test = read_source(path, "npz", 32, split="test")
    assert len(train) == 5085 and len(test) == 1017 and train.images.shape[1:] == (3, 32, 32)
    assert train.class_names == CIFAR10_NAMES and train.num_classes == 10
    assert train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert torch.bincount(test.labels).tolist() == [105, 93, 100, 104, 92, 87, 114, 102, 110, 110]
    x = np.load(path)["x_train"]
    assert torch.equal(train.images[:3], torch.from_numpy(x[:3].transpose(0, 3, 1, 2)))


def test_real_tiny_imagenet_subset(shared_data):
    root = shared_data / "tiny-imagenet-200-subset"
    wnids = (root / "wnids.txt").read_text().split()
    for split in ("train", "val"):
        data = read_source(str(root), "imagefolder", 32, split=split, max_per_class=5)
        assert len(data) == 800 and data.images.shape[1:] == (3, 32, 32) and data.num_classes == 160
        assert torch.bincount(data.labels, minlength=160).tolist() == [5] * 160
        assert data.class_names[wnids.index("n01443537")] == "goldfish"
        assert all(isinstance(n, str) and n and not n.startswith("n0") for n in data.class_names)
