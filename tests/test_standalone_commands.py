"""Stages on their own, from files: prepare SOURCE, info, pretrain --distilled, evaluate --encoder,
and architecture transfer."""

import json

import numpy as np
import torch

from ssdd.artifacts import load_encoder
from ssdd.distilled_set import save_arrays
from ssdd.cli import main
from ssdd.data import load_dataset


def rgb_npz(path, n_train=40, n_test=20, size=32):
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (n_train, size, size, 3), dtype=np.uint8), y_train=np.arange(n_train) % 4,
             x_test=rng.integers(0, 256, (n_test, size, size, 3), dtype=np.uint8), y_test=np.arange(n_test) % 4,
             class_names=np.array(["a", "b", "c", "d"]))
    return path


def test_prepare_then_info(tmp_path, capsys):
    src = rgb_npz(tmp_path / "raw.npz")
    out = tmp_path / "test.safetensors"
    assert main(["prepare", str(src), "--format", "npz", "--size", "16", "--split", "test", "--out", str(out)]) == 0
    data = load_dataset(out)
    assert data.images.shape == (20, 3, 16, 16) and data.class_names == ["a", "b", "c", "d"]
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 20 and info["shape"] == [3, 16, 16] and info["num_classes"] == 4 and info["has_labels"]


def test_pretrain_then_evaluate_from_files(tmp_path):
    torch.manual_seed(0)
    distilled = tmp_path / "set.safetensors"
    spec = {"arch": "convnet", "in_channels": 3, "image_size": 32, "widths": [8, 8], "pool": "gap", "out_dim": 0}
    save_arrays(distilled, torch.randn(10, 3, 32, 32), torch.randn(10, 5), {"method": "mine", "model_spec": spec})
    common = ["--no-progress", "--set", "evaluate.seeds=2", "--set", "pretrain.epochs=2"]
    assert main(["pretrain", "--distilled", str(distilled), "--out", str(tmp_path / "p"), *common]) == 0
    encoders = sorted((tmp_path / "p" / "encoders").glob("*.safetensors"))
    assert [e.name for e in encoders] == ["mine.safetensors", "mine.seed1.safetensors"]
    assert load_encoder(encoders[0])[1]["model_spec"]["out_dim"] == 5
    target = rgb_npz(tmp_path / "target.npz")
    assert main(["evaluate", "--encoder", str(encoders[0]), "none", "--targets", f"npz:{target}", "--out",
                 str(tmp_path / "e"), "--protocols", "linear", "finetune", "--label-fractions", "0.5", "1.0",
                 *common, "--set", "evaluate.finetune_iters=2", "--set", "evaluate.finetune_fractions=[1.0]",
                 "--set", "model.widths=[8, 8]"]) == 0
    rows = json.loads((tmp_path / "e" / "results.json").read_text())
    assert {r["method"] for r in rows} == {"mine", "no_pretrain"} and {r["seed"] for r in rows} == {0, 1}
    assert {(r["protocol"], r["label_fraction"]) for r in rows} == {("linear", 0.5), ("linear", 1.0), ("finetune", 1.0)}
    assert (tmp_path / "e" / "report.md").is_file() and (tmp_path / "e" / "results.csv").is_file()


def test_architecture_transfer_in_the_pipeline(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--preset", "demo", "--out", str(out), "--no-progress", "--set", "teacher.epochs=1",
            "--set", "data.heldout=300", "--set", "distill.krr_st.steps=2", "--set", "distill.m=10",
            "--set", "distill.krr_st.pool_max_age=2", "--set", "distill.krr_st.check_models=1", "--set", "pretrain.epochs=1",
            "--set", "evaluate.seeds=1", "--set", "evaluate.finetune_iters=1", "--set", "evaluate.linear_draws=1",
            "--set", "pretrain.archs=[\"resnet10\"]", "--until", "evaluate"]
    assert main(args) == 0
    assert (out / "encoders" / "krr_st@resnet10.safetensors").is_file()
    rows = json.loads((out / "results.json").read_text())
    transfer = [r for r in rows if r["group"] == "resnet10"]
    assert {r["method"] for r in transfer} == {"krr_st", "random_subset", "no_pretrain"}
    assert {r["protocol"] for r in transfer} == {"finetune"} and {r["arch"] for r in transfer} == {"resnet10"}


def test_kd_protocol(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--preset", "demo", "--out", str(out), "--no-progress", "--set", "teacher.epochs=1",
            "--set", "data.heldout=300", "--set", "distill.krr_st.steps=2", "--set", "distill.m=10",
            "--set", "distill.krr_st.pool_max_age=2", "--set", "distill.krr_st.check_models=1", "--set", "pretrain.epochs=1",
            "--set", "evaluate.seeds=2", "--set", "evaluate.finetune_iters=3", "--set", "evaluate.kd_iters=3",
            "--set", "evaluate.protocols=[\"kd\"]", "--until", "evaluate"]
    assert main(args) == 0
    rows = [r for r in json.loads((out / "results.json").read_text()) if r["protocol"] == "kd"]
    assert {r["method"] for r in rows} == {"supervised_teacher", "krr_st", "random_subset", "gaussian_noise"}
    assert len([r for r in rows if r["method"] == "krr_st"]) == 2 and all(0 <= r["accuracy"] <= 1 for r in rows)


def test_dsa_augment_is_seeded_and_keeps_shape():
    from ssdd.evaluate.kd import dsa_augment

    x = torch.randn(6, 3, 16, 16)
    a = dsa_augment(x, torch.Generator().manual_seed(1))
    b = dsa_augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
