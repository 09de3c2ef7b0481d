"""The method engine: every registered method runs for a few steps on a tiny slice through the
pipeline and leaves a checked artifact; seeds are paired draws; compare resumes and redoes only
what is new; fingerprints keep targets away from the teacher and distillation."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ssdd import artifacts, distilled_set
from ssdd.cli import main
from ssdd.distill import registry

SET_METHODS = [name for name in registry.names() if registry.get(name).kind == "set"]
ENCODER_METHODS = [name for name in registry.names() if registry.get(name).kind == "encoder"]


def smoke_settings() -> dict[str, object]:
    """The tiny settings every set method declares next to itself: its module's ``SMOKE`` dict (the smallest
    values of the config sections that module owns). A method whose module declares none fails here, by name."""
    settings: dict[str, object] = {}
    for name in SET_METHODS:
        module = sys.modules[registry.get(name).run.__module__]
        smoke = getattr(module, "SMOKE", None)
        assert isinstance(smoke, dict), (f"method {name}: its module {module.__name__} declares no SMOKE dict "
                                         "(the tiny settings tests/test_methods.py runs it with)")
        for key, value in smoke.items():
            assert settings.get(key, value) == value, (f"{module.__name__}.SMOKE: {key}={value!r} conflicts with "
                                                       f"{settings[key]!r}")
            settings[key] = value
    return settings


def tiny_npz(path: Path, n: int = 48, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8), y=np.arange(n) % 4)
    return f"npz:{path}"


def tiny_args(src: str, targets: list[str], methods: list[str], seeds: int = 2) -> list[str]:
    pairs = ["data.size=16", f"data.source={src}", f"data.targets={json.dumps(targets)}", "data.heldout=8",
             "teacher.epochs=1", "teacher.batch=16", "teacher.projector=[16, 16]", "teacher.model.widths=[8, 8]",
             "model.widths=[4, 8]", "model.pool=flatten", "model.norm=instance", "distill.m=6",
             "distill.batch=8", *(f"{key}={json.dumps(value)}" for key, value in smoke_settings().items()),
             "pretrain.epochs=2",
             "pretrain.batch=8", f"evaluate.seeds={seeds}", "evaluate.protocols=[\"linear\"]",
             "evaluate.linear_fractions=[0.25]", "evaluate.linear_draws=1", "evaluate.linear_c_grid=[1.0]",
             "evaluate.validation=0.0", "evaluate.probe_features=flatten", f"methods={json.dumps(methods)}"]
    return ["--no-progress"] + [x for pair in pairs for x in ("--set", pair)]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("methods")
    src = tiny_npz(tmp / "src.npz")
    out = tmp / "run"
    methods = SET_METHODS + ENCODER_METHODS
    assert main(["compare", "--out", str(out), *tiny_args(src, [src], methods)]) == 0
    return out, src, methods


@pytest.mark.slow
def test_every_method_leaves_a_checked_artifact_per_seed(full_run):
    out, _, methods = full_run
    for name in SET_METHODS:
        for k, suffix in ((0, ""), (1, ".seed1")):
            images, targets, meta = distilled_set.load_arrays(out / "distilled" / f"{name}{suffix}.safetensors")
            assert images.shape == (6, 3, 16, 16) and torch.isfinite(images).all(), name
            assert meta["method"] == name and meta["seed"] == k and meta["fingerprint"]
            if meta["objective"] == "barlow_twins":
                assert targets.shape == (6, 0)  # pre-trained by SSL on the images
            else:
                assert targets.shape[0] == 6 and targets.shape[1] > 0
    # paired draws: random_subset of seed k is exactly KRR-ST's start of seed k, and seeds differ
    for suffix in ("", ".seed1"):
        a = artifacts.read_meta(out / "distilled" / f"krr_st{suffix}.safetensors")["init_index"]
        assert artifacts.read_meta(out / "distilled" / f"random_subset{suffix}.safetensors")["init_index"] == a
        assert artifacts.read_meta(out / "distilled" / f"random_ssl{suffix}.safetensors")["init_index"] == a
    assert (artifacts.read_meta(out / "distilled" / "krr_st.safetensors")["init_index"]
            != artifacts.read_meta(out / "distilled" / "krr_st.seed1.safetensors")["init_index"])
    mkdt = artifacts.read_meta(out / "distilled" / "mkdt.safetensors")
    assert mkdt["lr"] is not None and mkdt["lr"] != 0.1  # the learned inner lr
    kmeans = artifacts.read_meta(out / "distilled" / "kmeans.safetensors")["init_index"]
    assert len(set(kmeans)) == 6
    rows = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in rows} == set(methods)
    for name in ("compare.md", "compare.csv", "compare.json", "compare.png", "report.md"):
        assert (out / name).is_file()
    table = (out / "compare.md").read_text()
    assert all(name in table for name in methods) and "**" in table


@pytest.mark.slow
def test_compare_reuses_finished_methods_and_adding_a_target_keeps_teacher_and_sets(full_run, tmp_path, caplog):
    out, src, methods = full_run
    other = tiny_npz(tmp_path / "other.npz", seed=1)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "distilled").glob("*.safetensors")}
    teacher_time = (out / "teacher.safetensors").stat().st_mtime_ns
    caplog.set_level("INFO", logger="ssdd")
    assert main(["compare", "--out", str(out), *tiny_args(src, [src, other], ["krr_st", "random_subset", "kmeans"])]) == 0
    assert (out / "teacher.safetensors").stat().st_mtime_ns == teacher_time  # a new target never retrains
    after = {p.name: p.stat().st_mtime_ns for p in (out / "distilled").glob("*.safetensors")}
    assert all(after[name] == t for name, t in before.items())  # ... nor re-distils
    rows = json.loads((out / "results.json").read_text())
    assert {r["target"] for r in rows} == {"src", "other"} and {r["method"] for r in rows} == {
        "krr_st", "random_subset", "kmeans"}


def test_two_targets_with_one_stem_do_not_overwrite(tmp_path):
    from ssdd.layout import unique_target_names

    names = unique_target_names(["npz:a/data.npz", "npz:b/data.npz", "digits"])
    assert len(set(names.values())) == 3 and names["digits"] == "digits"


def test_unknown_method_is_refused_before_work(tmp_path, capsys):
    src = tiny_npz(tmp_path / "src.npz")
    code = main(["run", "--out", str(tmp_path / "o"), *tiny_args(src, [src], ["krr_st", "nosuch"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nosuch" in err[0] and "random_subset" in err[0]
    assert not (tmp_path / "o" / "data").exists()


def test_every_registered_method_is_run_and_declares_its_smoke_settings():
    assert set(SET_METHODS + ENCODER_METHODS) == set(registry.names())  # no other kind slips past the run above
    assert {"no_pretrain", "full_ssl"} <= set(ENCODER_METHODS) and {"krr_st", "random_subset"} <= set(SET_METHODS)
    assert all(registry.get(n).run is None for n in ENCODER_METHODS)
    assert smoke_settings()  # every set method's module declares SMOKE (fails naming the method otherwise)


def test_kmeans_takes_the_real_image_nearest_each_centroid():
    from ssdd.settings import DistillConfig
    from ssdd.data import ImageSet, Normalizer
    from ssdd.distill import DistillContext, random_index
    from ssdd.distill.methods.subsets import kmeans

    # two tight clusters in teacher space (the teacher reads the mean pixel): one image from each
    images = torch.cat([torch.full((10, 1, 4, 4), 10, dtype=torch.uint8), torch.full((10, 1, 4, 4), 240, dtype=torch.uint8)])
    images[3] += 1
    images[15] -= 1
    source = ImageSet(images)

    class MeanPixel(torch.nn.Module):
        def forward(self, x):
            return x.mean((1, 2, 3))[:, None]

    ctx = DistillContext(source, None, MeanPixel(), Normalizer([0.5], [0.25]), {}, DistillConfig(m=2), 0,
                         random_index(20, 2, 0), "cpu", False)
    result = kmeans(ctx)
    index = result.meta["init_index"]
    assert len(index) == 2 and index[0] < 10 <= index[1]
    torch.testing.assert_close(result.targets, MeanPixel()(ctx.norm(images[index])))


def test_evaluate_works_with_a_torchscript_teacher(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 7))
    teacher = tmp_path / "teacher.pt"
    torch.jit.script(net).save(str(teacher))
    src = tiny_npz(tmp_path / "src.npz")
    out = tmp_path / "run"
    args = tiny_args(src, [src], ["random_subset", "full_ssl"], seeds=1)
    args += ["--set", f"teacher.path={teacher}", "--set", 'evaluate.protocols=["linear","finetune"]',
             "--set", "evaluate.finetune_iters=2", "--set", "evaluate.finetune_batch=8",
             "--set", "evaluate.finetune_fractions=[1.0]", "--set", "evaluate.probe_features=gap"]
    assert main(["run", "--out", str(out), *args]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["protocol"]) for r in rows} == {
        ("random_subset", "linear"), ("random_subset", "finetune"), ("full_ssl", "linear"), ("full_ssl", "finetune")}


def test_a_missing_per_seed_encoder_is_an_error(tmp_path, capsys):
    src = tiny_npz(tmp_path / "src.npz")
    out = tmp_path / "run"
    args = tiny_args(src, [src], ["random_subset"], seeds=2)
    assert main(["run", "--out", str(out), "--until", "pretrain", *args]) == 0
    (out / "encoders" / "random_subset.seed1.safetensors").unlink()
    assert main(["evaluate", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "random_subset.seed1.safetensors" in err and "seed 1" in err


def test_bundled_format_honours_split():
    from ssdd.data.formats import read_source

    from ssdd.data.bundled import load_bundled
    from ssdd.data.dataset import stratified_split

    train = read_source("digits", "bundled", 16, "train")
    test = read_source("digits", "bundled", 16, "test")
    full = load_bundled("digits", 16)
    train_idx, test_idx = stratified_split(full.labels, 0.3, seed=0)  # the split targets use
    assert len(train) + len(test) == 1797 and abs(len(test) / 1797 - 0.3) < 0.01
    assert torch.equal(test.images, full.images[test_idx]) and torch.equal(train.labels, full.labels[train_idx])


def test_diagnose_grad_variance_command(tmp_path):
    src = tiny_npz(tmp_path / "src.npz")
    out = tmp_path / "run"
    assert main(["diagnose", "grad-variance", "--out", str(out), "--draws", "3",
                 *tiny_args(src, [src], ["krr_st"], seeds=1)]) == 0
    result = json.loads((out / "grad_variance.json").read_text())
    text = json.dumps(result)
    assert "krr_st" in text and "naive_bilevel" in text and (out / "grad_variance.png").stat().st_size > 1000
