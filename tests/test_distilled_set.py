"""The distilled-set artifact (``ssdd.distilled_set``): schema versions, checks, pixel space; and the
run-folder layout (``ssdd.layout``) the pipeline writes and the report and compare read."""

import json

import numpy as np
import pytest
import torch

import ssdd
from ssdd import artifacts, distilled_set, layout
from ssdd.data import Normalizer
from ssdd.distilled_set import SCHEMA_VERSION, DistilledArtifact
from ssdd.errors import UserError

import test_cli_errors
from test_cli_errors import assert_one_line_error

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
SPEC = {"arch": "convnet", "in_channels": 3, "image_size": 8, "widths": [8], "pool": "gap", "out_dim": 5}


def _artifact(space="normalized", n=6, d=5, **fields):
    gen = torch.Generator().manual_seed(3)
    return DistilledArtifact(torch.randn(n, 3, 8, 8, generator=gen), torch.randn(n, d, generator=gen),
                             method=fields.pop("method", "mine"), image_space=space, mean=MEAN, std=STD, **fields)


def _fields(art):
    return (art.method, art.objective, art.lr, art.image_space, art.mean, art.std, art.model_spec, art.fingerprint,
            art.meta)


def _write_v1(path, images, targets, meta):
    """A set exactly as ssdd wrote it before the schema had a version (artifacts.save_distilled)."""
    artifacts.save_tensors(path, {"images": images.float(), "targets": targets.float()},
                           {"kind": "distilled_set", **meta})


def test_schema_version_round_trip(tmp_path):
    path = tmp_path / "mine.safetensors"
    art = _artifact(lr=0.02, model_spec=SPEC, fingerprint="abc", meta={"seed": 7, "init_index": [3, 1, 2]})
    distilled_set.save(path, art)
    recorded = artifacts.read_meta(path)
    assert recorded["schema_version"] == SCHEMA_VERSION == 2 and recorded["kind"] == "distilled_set"
    assert recorded["image_space_note"] == distilled_set.SPACE_NOTES["normalized"] and "ssdd_version" in recorded
    back = distilled_set.load(path)
    assert _fields(back) == _fields(art) and back.schema_version == SCHEMA_VERSION and back.path == path
    assert torch.equal(back.images, art.images) and torch.equal(back.targets, art.targets)
    assert back.meta == {"seed": 7, "init_index": [3, 1, 2]} and back.recorded == recorded
    # optional fields are left out when unset; lr is recorded as null
    bare = tmp_path / "bare.safetensors"
    distilled_set.save(bare, DistilledArtifact(art.images, art.targets, method="bare"))
    recorded = artifacts.read_meta(bare)
    assert recorded["lr"] is None and not {"model_spec", "fingerprint", "mean", "std"} & set(recorded)
    assert distilled_set.load(bare).objective == "mse"


def test_version_1_file_loads_unchanged(tmp_path):
    """Files written before the version existed: today's run folders and imports keep loading, and those
    written with only some keys get the defaults their readers always applied."""
    gen = torch.Generator().manual_seed(4)
    images, targets = torch.randn(5, 3, 8, 8, generator=gen), torch.randn(5, 4, generator=gen)
    full = tmp_path / "krr_st.safetensors"
    meta = {"method": "krr_st", "seed": 0, "k": 0, "fingerprint": "f" * 16, "objective": "mse", "lr": None,
            "source": "digits", "teacher": "teacher.safetensors", "image_space": "normalized",
            "image_space_note": distilled_set.SPACE_NOTES["normalized"], "mean": MEAN, "std": STD, "model_spec": SPEC,
            "init_index": [0, 1, 2, 3, 4], "steps": 30}
    _write_v1(full, images, targets, meta)
    art = distilled_set.load(full)
    assert art.schema_version == 1 and art.method == "krr_st" and art.image_space == "normalized"
    assert art.mean == MEAN and art.model_spec == SPEC and art.fingerprint == "f" * 16 and art.lr is None
    assert art.meta == {"seed": 0, "k": 0, "source": "digits", "teacher": "teacher.safetensors",
                        "init_index": [0, 1, 2, 3, 4], "steps": 30}
    assert distilled_set.load_arrays(full)[2] == artifacts.read_meta(full)  # the metadata as recorded, untouched
    assert torch.equal(art.images, images) and torch.equal(art.targets, targets)
    sparse = tmp_path / "old_set.safetensors"
    _write_v1(sparse, images, targets, {})
    old = distilled_set.load(sparse)
    assert (old.method, old.objective, old.image_space, old.lr, old.mean) == ("old_set", "mse", "reference", None, None)
    data = ssdd.load_distilled(sparse)
    assert data.method == "old_set" and data.mean == [0.0] * 3 and data.std == [1.0] * 3
    assert torch.equal(data.pixels(), images.clamp(0, 1))
    # a version-1 set re-written is version 2 with the same content
    distilled_set.save(tmp_path / "again.safetensors", art)
    again = distilled_set.load(tmp_path / "again.safetensors")
    assert again.schema_version == 2 and _fields(again) == _fields(art)


DROP = object()  # a key left out of the file
BAD = {
    "shapes": ({"images": torch.randn(4, 8, 8)}, {}, "expected images (m,C,H,W) and targets (m,d)"),
    "counts": ({"targets": torch.randn(3, 5)}, {}, "got (4, 3, 8, 8) and (3, 5)"),
    "nan": ({"images": torch.full((4, 3, 8, 8), float("nan"))}, {}, "NaN or inf"),
    "integer_images": ({"images": torch.zeros(4, 3, 8, 8, dtype=torch.uint8)}, {}, "expected float images"),
    "objective": ({}, {"objective": "hinge"}, "'objective' must be one of mse, cross_entropy, barlow_twins"),
    "no_targets": ({"targets": torch.zeros(4, 0)}, {}, "objective mse needs targets (m,d) with d >= 1"),
    "space": ({}, {"image_space": "raw"}, "'image_space' must be normalized or reference, got 'raw'"),
    "no_mean": ({}, {"mean": DROP}, "normalised but the metadata records no mean"),
    "mean_length": ({}, {"mean": [0.1, 0.2]}, "'mean' must be a list of 3 finite numbers"),
    "std_zero": ({}, {"std": [0.2, 0.0, 0.3]}, "'std' must be positive"),
    "lr": ({}, {"lr": "fast"}, "'lr' must be a finite number or null"),
    "model_spec": ({}, {"model_spec": [1, 2]}, "'model_spec' must be a model spec"),
    "newer": ({}, {"schema_version": 3}, "schema version 3, written by a newer ssdd"),
    "version_text": ({}, {"schema_version": "two"}, "'schema_version' must be a positive integer"),
    "v2_missing": ({}, {"schema_version": 2, "objective": DROP}, "lacks metadata ['objective']"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_validate_says_one_line_what_was_expected(tmp_path, case):
    tensors, changes, needle = BAD[case]
    path = tmp_path / f"{case}.safetensors"
    gen = torch.Generator().manual_seed(5)
    data = {"images": torch.randn(4, 3, 8, 8, generator=gen), "targets": torch.randn(4, 5, generator=gen), **tensors}
    meta = {"kind": "distilled_set", "method": "m", "objective": "mse", "lr": None, "image_space": "normalized",
            "mean": MEAN, "std": STD}
    meta.update(changes)
    artifacts.save_tensors(path, data, {k: v for k, v in meta.items() if v is not DROP})
    with pytest.raises(UserError) as err:
        distilled_set.load(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and needle in message, message


def test_writers_refuse_a_bad_schema_before_the_file_exists(tmp_path):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(UserError, match=f"{path}: metadata 'objective' must be one of"):
        distilled_set.save(path, _artifact(objective="hinge"))
    with pytest.raises(ValueError, match="would overwrite the set's own fields"):
        distilled_set.save(path, _artifact(meta={"lr": 0.1}))
    assert not path.exists() and not list(tmp_path.iterdir())


def test_cli_names_the_file_in_one_line(tmp_path, capsys):
    path = tmp_path / "future.safetensors"
    artifacts.save_tensors(path, {"images": torch.zeros(2, 1, 4, 4), "targets": torch.zeros(2, 3)},
                           {"kind": "distilled_set", "schema_version": 9, "method": "m"})
    code, lines = test_cli_errors.run_cli(["export", str(path), "--format", "npz", "--out", str(tmp_path / "o.npz")],
                                          capsys)
    assert_one_line_error(code, lines, f"{path}: distilled set of schema version 9")
    assert not (tmp_path / "o.npz").exists()


def test_to_unit_equals_the_old_implementations():
    """One to_unit: what export (interop.to_unit), the report's grid (numpy, float64) and KD
    (Normalizer.to_unit, clipped) each computed before."""
    gen = torch.Generator().manual_seed(6)
    images = torch.randn(9, 3, 8, 8, generator=gen) * 2
    art = DistilledArtifact(images, torch.randn(9, 4, generator=gen), method="m", image_space="normalized",
                            mean=MEAN, std=STD)
    old_export = images.float() * torch.tensor(STD).view(1, -1, 1, 1) + torch.tensor(MEAN).view(1, -1, 1, 1)
    assert torch.equal(art.to_unit(), old_export)
    assert torch.equal(art.pixels(), Normalizer(MEAN, STD).to_unit(images))
    old_report = np.clip(images.numpy().astype(float) * np.asarray(STD).reshape(1, -1, 1, 1)
                         + np.asarray(MEAN).reshape(1, -1, 1, 1), 0, 1)
    assert np.allclose(art.pixels().numpy(), old_report, atol=1e-6)
    one = DistilledArtifact(images, art.targets, method="m", image_space="normalized", mean=[0.5], std=[0.25])
    assert torch.equal(one.to_unit(), images * 0.25 + 0.5)  # one value for every channel
    ref = DistilledArtifact(images, art.targets, method="m", image_space="reference", mean=MEAN, std=STD)
    assert torch.equal(ref.to_unit(), images) and torch.equal(ref.pixels(), images.clamp(0, 1))


def test_layout_names_what_the_pipeline_writes(tmp_path):
    out = tmp_path / "run"
    assert layout.distilled_path(out, "krr_st", 0) == out / "distilled" / "krr_st.safetensors"
    assert layout.distilled_path(out, "krr_st", 2) == out / "distilled" / "krr_st.seed2.safetensors"
    assert layout.encoder_path(out, "krr_st", 1, "vgg11") == out / "encoders" / "krr_st@vgg11.seed1.safetensors"
    assert layout.evaluation_path(out, "convnet", "mkdt", 1, "c10") == out / "evaluations/convnet/mkdt.seed1.c10.json"
    assert layout.distill_timing_key("krr_st", 1) == "distill/krr_st/seed1"
    assert layout.prep_timing_key("experts") == "prep/experts"
    assert layout.read_timings(out) == {}
    artifacts.write_json(layout.timings_path(out), {layout.distill_timing_key("mkdt", 0): 1.5})
    assert layout.read_timings(out) == {"distill/mkdt/seed0": 1.5}
    for path in (layout.distilled_path(out, "krr_st", 0), layout.distilled_path(out, "krr_st", 1),
                 layout.distilled_path(out, "random_subset", 0), layout.prep_path(out, "experts")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    assert [p.name for p in layout.first_seed_sets(out)] == ["krr_st.safetensors", "random_subset.safetensors"]
    names = layout.unique_target_names(["npz:a/data.npz", "npz:b/data.npz", "digits"])
    assert names["digits"] == "digits" and names["npz:a/data.npz"] != names["npz:b/data.npz"]


def test_atomic_folder_keeps_the_old_folder_when_filling_fails(tmp_path):
    out = tmp_path / "export"
    with artifacts.atomic_folder(out) as folder:
        (folder / "a.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with artifacts.atomic_folder(out) as folder:
            (folder / "a.txt").write_text("two")
            raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with artifacts.atomic_folder(out) as folder:
        (folder / "b.txt").write_text("three")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_records_the_metadata_as_recorded(tmp_path):
    """The npz export carries the file's own metadata (less its fingerprint), for either version."""
    gen = torch.Generator().manual_seed(8)
    v1 = tmp_path / "v1.safetensors"
    _write_v1(v1, torch.rand(3, 1, 4, 4, generator=gen), torch.randn(3, 2, generator=gen),
              {"method": "m", "fingerprint": "x", "lr": 0.5})
    from ssdd.interop import export_set
    out = export_set(v1, "npz", tmp_path / "v1.npz")
    with np.load(out, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        assert meta == {k: v for k, v in artifacts.read_meta(v1).items() if k != "fingerprint"}
        assert str(z["objective"]) == "mse" and str(z["image_space"]) == "reference" and float(z["lr"]) == 0.5
