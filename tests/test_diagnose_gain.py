"""``ssdd diagnose images-vs-targets``: the start it rebuilds is the engine's, its four held-out losses agree
with the method's own recorded check at both ends, an undistilled set moved nowhere, and the movement and
split arithmetic against closed forms."""

import json

import numpy as np
import pytest
import torch

from ssdd import distilled_set
from ssdd.cli import main
from ssdd.distill import distill_krr_st
from ssdd.distill.diagnose_gain import format_table, gain_split, movement, split
from ssdd.distill.engines.krr_engine import KrrStConfig, initial_set
from ssdd.errors import UserError
from test_distill import context, setup


def test_rebuilt_start_is_the_start_the_engine_used():
    source, teacher, norm, cfg = setup()
    cfg.krr_st = KrrStConfig(steps=1, pool_size=2, pool_max_age=3)
    for space in ("normalized", "reference"):
        cfg.image_space = space
        ctx = context(source, teacher, norm, cfg, 3)
        result = distill_krr_st(ctx)
        x0, y0 = initial_set(ctx, result.init_index)
        assert torch.equal(x0, result.init_images) and torch.equal(y0, result.init_targets)
        assert not torch.equal(result.images, result.init_images)  # one step moved it: the start is not the end


def test_movement_and_split_closed_forms():
    x0 = torch.full((2, 1, 2, 2), -1.0)
    x = x0 + torch.tensor([0.1, -0.3]).view(2, 1, 1, 1)
    y0 = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    move = movement(x0, x, y0, 1.1 * y0, "normalized", [0.5], [0.2])
    im, tg = move["images"], move["targets"]
    assert im["mean_abs_delta"] == pytest.approx(0.2) and im["relative"] == pytest.approx(0.2)
    assert im["mean_abs_delta_pixels"] == pytest.approx(0.2 * 0.2 * 255)  # |dx| * std * 255
    assert im["mean_start_pixels"] == pytest.approx((0.5 - 0.2) * 255)  # pixel of x = -1: (mean - std) * 255
    assert im["max_abs_delta_pixels"] == pytest.approx(0.3 * 0.2 * 255) and im["out_of_range"] == 0.0
    assert tg["relative_norm_change"] == pytest.approx(0.1) and tg["norm_ratio"] == pytest.approx(1.1)
    still = movement(x0, x0.clone(), y0, y0.clone(), "reference", None, None)
    assert all(still["images"][k] == 0 for k in ("mean_abs_delta", "mean_abs_delta_pixels", "max_abs_delta_pixels"))
    assert still["targets"]["relative_norm_change"] == 0 and still["targets"]["norm_ratio"] == 1
    gain = split({"initial": 1.0, "distilled_images": 0.7, "distilled_targets": 0.9, "distilled": 0.5})
    assert gain["total"] == pytest.approx(0.5) and gain["images_alone"] == pytest.approx(0.3)
    assert gain["targets_alone"] == pytest.approx(0.1) and gain["interaction"] == pytest.approx(0.1)
    assert gain["share"]["images_alone"] == pytest.approx(0.6) and gain["relative_to_start"] == pytest.approx(0.5)
    assert split(dict.fromkeys(("initial", "distilled_images", "distilled_targets", "distilled"), 2.0))["share"] == {
        "images_alone": None, "targets_alone": None, "interaction": None}


def test_sets_without_learned_mse_targets_are_refused():
    art = distilled_set.DistilledArtifact(torch.zeros(2, 1, 4, 4), torch.zeros(2, 0), "random_ssl",
                                          objective="barlow_twins", meta={"init_index": [0, 1]})
    with pytest.raises(UserError, match="learned MSE targets"):
        gain_split(None, art)  # refused before anything is computed


def _args(tmp_path, methods):
    rng = np.random.default_rng(0)
    src = tmp_path / "src.npz"
    np.savez(src, x=rng.integers(0, 256, (48, 16, 16, 3), dtype=np.uint8), y=np.arange(48) % 4)
    pairs = ["data.size=16", f"data.source=npz:{src}", f"data.targets=[\"npz:{src}\"]", "data.heldout=10",
             "teacher.epochs=1", "teacher.batch=16", "teacher.projector=[16, 16]", "teacher.model.widths=[8, 8]",
             "model.widths=[4, 8]", "distill.m=6", "distill.batch=8", "distill.krr_st.steps=3",
             "distill.krr_st.lr_images=0.05", "distill.krr_st.lr_targets=0.05", "distill.krr_st.pool_size=2",
             "distill.krr_st.pool_max_age=4", "distill.krr_st.check_models=2", "distill.krr_st.check_batches=2",
             "evaluate.seeds=1", f"methods={json.dumps(methods)}"]
    return ["--out", str(tmp_path / "run"), "--no-progress"] + [x for p in pairs for x in ("--set", p)]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gain")
    args = _args(tmp, ["krr_st", "random_subset"])
    assert main(["run", "--until", "distill", *args]) == 0
    return tmp, args


def test_four_losses_agree_with_the_methods_own_check(run_folder, capsys):
    tmp, args = run_folder
    assert main(["diagnose", "images-vs-targets", *args]) == 0
    printed = capsys.readouterr().out
    out = tmp / "run"
    result = json.loads((out / "images_vs_targets.krr_st.json").read_text())
    recorded = distilled_set.read_meta(out / "distilled" / "krr_st.safetensors")["heldout_check"]
    losses = result["losses"]
    assert losses["initial"] == pytest.approx(recorded["init"], rel=1e-6)  # the check at step 0
    assert losses["distilled"] == pytest.approx(recorded["distilled"], rel=1e-6)  # the check at the end
    assert losses["distilled"] != pytest.approx(losses["initial"], rel=1e-6)  # three steps changed something
    assert len({round(v, 12) for v in losses.values()}) == 4  # the two mixed sets are sets of their own
    gain = result["gain"]
    assert gain["images_alone"] + gain["targets_alone"] + gain["interaction"] == pytest.approx(gain["total"])
    assert result["recorded_check"]["max_relative_difference"] < 1e-6
    assert result["movement"]["images"]["mean_abs_delta"] > 0 and result["movement"]["targets"]["relative_norm_change"] > 0
    assert printed == format_table(result) and "distilled images + initial targets" in printed
    assert (out / "images_vs_targets.krr_st.png").stat().st_size > 1000
    assert (out / "images_vs_targets.krr_st.txt").read_text() == printed


def test_an_undistilled_set_moved_nowhere(run_folder):
    tmp, args = run_folder
    assert main(["diagnose", "images-vs-targets", "--method", "random_subset", *args]) == 0
    result = json.loads((tmp / "run" / "images_vs_targets.random_subset.json").read_text())
    im, tg = result["movement"]["images"], result["movement"]["targets"]
    assert im["mean_abs_delta"] == 0 and im["mean_abs_delta_pixels"] == 0 and im["max_abs_delta_pixels"] == 0
    assert tg["relative_norm_change"] == 0 and tg["norm_ratio"] == 1
    start = result["losses"]["initial"]
    assert all(v == pytest.approx(start, rel=1e-6) for v in result["losses"].values())


def test_a_missing_seed_is_one_line(run_folder, capsys):
    _, args = run_folder
    assert main(["diagnose", "images-vs-targets", "--seed-index", "1", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "krr_st.seed1.safetensors" in err and "ssdd distill" in err


@pytest.fixture(scope="module")
def views_folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gain_views")
    args = _args(tmp, ["krr_st", "random_subset"]) + ["--set", "distill.views=rot"]
    assert main(["run", "--until", "distill", *args]) == 0
    return tmp, args


def test_a_views_set_is_scored_as_its_own_check_scored_it(views_folder):
    """With views, each candidate is every view of its images with its targets: the rebuilt start and the
    distilled set reproduce the run's recorded check, and a real subset (teacher view targets) moved nowhere."""
    tmp, args = views_folder
    out = tmp / "run"
    assert main(["diagnose", "images-vs-targets", *args]) == 0
    result = json.loads((out / "images_vs_targets.krr_st.json").read_text())
    recorded = distilled_set.read_meta(out / "distilled" / "krr_st.safetensors")["heldout_check"]
    assert result["views"] == "rot"
    assert result["losses"]["initial"] == pytest.approx(recorded["init"], rel=1e-6)
    assert result["losses"]["distilled"] == pytest.approx(recorded["distilled"], rel=1e-6)
    assert len({round(v, 12) for v in result["losses"].values()}) == 4
    assert main(["diagnose", "images-vs-targets", "--method", "random_subset", *args]) == 0
    real = json.loads((out / "images_vs_targets.random_subset.json").read_text())
    assert real["movement"]["targets"]["relative_norm_change"] == pytest.approx(0, abs=1e-6)
    assert all(v == pytest.approx(real["losses"]["initial"], rel=1e-6) for v in real["losses"].values())
