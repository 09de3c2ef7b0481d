"""Paper presets start on a tiny slice; teachers trained elsewhere load (torchvision/solo-learn
keys, TorchScript) and bad ones are refused with one line."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ssdd.distilled_set import load_arrays
from ssdd.cli import main
from ssdd.models import build
from ssdd.models.resnet import torchvision_key_map


def tiny_npz(path: Path, size: int, n: int = 40) -> str:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), y=np.arange(n) % 4)
    return f"npz:{path}"


TINY = ["--set", "teacher.epochs=1", "--set", "teacher.batch=16", "--set", "teacher.projector=[32, 32]",
        "--set", "distill.m=6", "--set", "distill.krr_st.steps=2", "--set", "distill.batch=8", "--set", "distill.krr_st.pool_size=2",
        "--set", "distill.krr_st.pool_max_age=2", "--set", "distill.krr_st.check_models=1", "--set", "distill.krr_st.check_batches=1",
        "--set", "data.heldout=8", "--set", "evaluate.seeds=1"]


@pytest.mark.parametrize("preset,size", [("cifar100", 32), ("tinyimagenet", 64), ("imagenet64", 64)])
def test_paper_presets_start(preset, size, tmp_path):
    spec = tiny_npz(tmp_path / "src.npz", size, n=24)
    out = tmp_path / "run"
    args = ["run", "--preset", preset, "--out", str(out), "--no-progress", "--until", "distill",
            "--set", f"data.source={spec}", "--set", f"data.targets=[\"{spec}\"]", *TINY]
    assert main(args) == 0
    images, targets, meta = load_arrays(out / "distilled" / "krr_st.safetensors")
    assert images.shape == (6, 3, size, size) and targets.shape == (6, 512)  # ResNet-18 teacher: 512-d
    resolved = json.loads((out / "config.distill.json").read_text())["config"]
    assert resolved["distill"]["batch"] == 8 and resolved["teacher"]["model"]["arch"] == "resnet18"
    assert meta["model_spec"]["widths"] == ([128, 256, 512] if preset == "cifar100" else [64, 128, 256, 512])


def torchvision_layout(model) -> dict:
    """Our ResNet-18 state dict renamed to the torchvision / solo-learn layout."""
    inverse = {ours: theirs for theirs, ours in torchvision_key_map("resnet18").items()}
    out = {}
    for key, value in model.state_dict().items():
        for ours, theirs in sorted(inverse.items(), key=lambda kv: -len(kv[0])):
            if key.startswith(ours):
                out["backbone." + theirs + key[len(ours):]] = value
                break
    out["projector.0.weight"] = torch.zeros(4, 512)
    return out


def run_distill_with_teacher(tmp_path, teacher_file, extra=()):
    spec = tiny_npz(tmp_path / "src.npz", 32)
    out = tmp_path / "run"
    return main(["distill", "--preset", "demo", "--out", str(out), "--no-progress", "--teacher", str(teacher_file),
                 "--set", f"data.source={spec}", "--set", f"data.targets=[\"{spec}\"]", "--set", "model.widths=[8, 8]",
                 *TINY, *extra]), out


def test_solo_learn_resnet18_checkpoint_distils(tmp_path):
    torch.manual_seed(0)
    ours = build({"arch": "resnet18", "in_channels": 3, "image_size": 32, "out_dim": 0}).eval()
    ckpt = tmp_path / "solo.ckpt"
    torch.save({"state_dict": torchvision_layout(ours), "epoch": 3}, ckpt)
    code, out = run_distill_with_teacher(tmp_path, ckpt, ["--set", "teacher.model.arch=resnet18"])
    assert code == 0
    _, targets, _ = load_arrays(out / "distilled" / "random_subset.safetensors")
    # The random-subset targets are the teacher's features of real images: same weights, same numbers.
    from ssdd.data import load_dataset, Normalizer
    src = load_dataset(out / "data" / "source_train.safetensors")
    _, _, meta = load_arrays(out / "distilled" / "random_subset.safetensors")
    x = Normalizer(*src.mean_std())(src.images[meta["init_index"]])
    with torch.no_grad():
        torch.testing.assert_close(targets, ours.features(x), rtol=1e-4, atol=1e-4)


def test_torchscript_teacher(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 7))
    path = tmp_path / "teacher.pt"
    torch.jit.script(net).save(str(path))
    code, out = run_distill_with_teacher(tmp_path, path)
    assert code == 0 and load_arrays(out / "distilled" / "krr_st.safetensors")[1].shape == (6, 7)


def test_teacher_with_wrong_keys_is_refused(tmp_path, capsys):
    ckpt = tmp_path / "bad.pt"
    torch.save({"conv9.weight": torch.zeros(3)}, ckpt)
    code, out = run_distill_with_teacher(tmp_path, ckpt, ["--set", "teacher.model.arch=resnet18"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "missing" in err and "unexpected ['conv9.weight']" in err
    assert not (out / "distilled" / "krr_st.safetensors").exists()


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_teacher_checkpoint_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil(marker)}, ckpt, pickle_module=pickle)
    code, _ = run_distill_with_teacher(tmp_path, ckpt)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "weights-only" in err and not marker.exists()
