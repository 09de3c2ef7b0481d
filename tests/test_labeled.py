"""Labelled baselines: the source's labels reach only methods that ask for them, sets made of
labels pre-train by cross-entropy, and an unlabelled source gives one clear error."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssdd import artifacts, distilled_set
from ssdd.cli import main
from ssdd.config import PretrainConfig
from ssdd.models import build
from ssdd.pretrain import pretrain_encoder
from test_methods import tiny_args, tiny_npz


def test_cross_entropy_pretraining_minimises_cross_entropy_to_the_label_distribution():
    spec = {"arch": "convnet", "in_channels": 3, "image_size": 16, "widths": [4, 8], "pool": "flatten",
            "norm": "instance", "out_dim": 0}
    images = torch.randn(8, 3, 16, 16)
    labels = torch.arange(8) % 4
    soft = F.one_hot(labels, 4).float() * 0.7 + 0.3 / 4  # soft labels: rows sum to one
    cfg = PretrainConfig(epochs=3, batch=8)
    _, curve = pretrain_encoder(images, soft, spec, cfg, seed=5, objective="cross_entropy", progress=False)
    torch.manual_seed(5)
    model = build({**spec, "out_dim": 4}).train()
    first = F.cross_entropy(model(images), soft).item()  # epoch 1 = one step from the seed's init
    assert curve[0] == pytest.approx(first, rel=1e-5)
    assert curve[-1] < curve[0]
    with pytest.raises(ValueError):
        pretrain_encoder(images, soft, spec, cfg, seed=5, objective="hinge", progress=False)


def test_random_subset_labeled_keeps_the_paired_draw_and_its_labels(tmp_path):
    src = tiny_npz(tmp_path / "src.npz")
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--until", "pretrain",
                 *tiny_args(src, [src], ["random_subset", "random_subset_labeled"], seeds=1)]) == 0
    _, targets, meta = distilled_set.load_arrays(out / "distilled" / "random_subset_labeled.safetensors")
    plain = artifacts.read_meta(out / "distilled" / "random_subset.safetensors")
    assert meta["objective"] == "cross_entropy" and meta["init_index"] == plain["init_index"]
    labels = artifacts.load_tensors(out / "data" / "source_labels.safetensors")[0]["labels"]
    assert torch.equal(targets.argmax(1), labels[meta["init_index"]]) and torch.equal(targets.sum(1), torch.ones(6))
    # its encoder's head has one output per class
    spec = artifacts.read_meta(out / "encoders" / "random_subset_labeled.safetensors")["model_spec"]
    assert spec["out_dim"] == 4


def test_a_labelled_method_on_an_unlabelled_source_is_one_clear_error(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "plain.npz", x=rng.integers(0, 256, (48, 16, 16, 3), dtype=np.uint8))
    src = f"npz:{tmp_path / 'plain.npz'}"
    target = tiny_npz(tmp_path / "target.npz")
    code = main(["run", "--out", str(tmp_path / "run"), "--until", "distill",
                 *tiny_args(src, [target], ["random_subset_labeled"], seeds=1)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "random_subset_labeled needs a labelled source" in err[-1]
    assert "Traceback" not in "\n".join(err)
