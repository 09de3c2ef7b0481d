"""Views with their own targets (issue 19): the view maps, the teacher's view targets of a real subset,
KRR-ST's learned view targets, the approximation network, storage, and pre-training on every view."""

import pytest
import torch

from ssdd import distilled_set, pretrain_recipes
from ssdd.cli import main
from ssdd.settings import Config
from ssdd.data import Normalizer, load_dataset
from ssdd.distill.registry import random_index
from ssdd.models import encoder_from_artifact
from ssdd.views import approx, apply_view, count, expand, expand_targets

TINY = ["--set", "teacher.epochs=1", "--set", "distill.krr_st.steps=3", "--set", "distill.krr_st.pool_size=2",
        "--set", "distill.krr_st.pool_max_age=3", "--set", "distill.krr_st.check_models=1",
        "--set", "distill.krr_st.check_batches=1", "--set", "data.heldout=200", "--set", "distill.m=20",
        "--set", "pretrain.epochs=2", "--set", "evaluate.seeds=1", "--set", "evaluate.protocols=[\"linear\"]",
        "--set", "evaluate.linear_fractions=[0.1]", "--set", "evaluate.linear_draws=1",
        "--set", "evaluate.linear_c_grid=[1.0]", "--set", "methods=[\"krr_st\",\"random_subset\"]"]


@pytest.mark.parametrize("family", ["rot", "flip", "rotflip", "crops"])
def test_view_zero_is_the_image_and_expand_is_view_major(family):
    x = torch.randn(3, 2, 8, 8)
    k = count(family)
    assert torch.equal(apply_view(x, family, 0), x)
    big = expand(x, family)
    assert big.shape == (3 * k, 2, 8, 8)
    for v in range(k):
        assert torch.equal(big[v * 3:(v + 1) * 3], apply_view(x, family, v))
    base, vt = torch.randn(3, 5), torch.randn(3, k - 1, 5)
    t = expand_targets(base, vt)
    assert torch.equal(t[:3], base) and all(torch.equal(t[v * 3:(v + 1) * 3], vt[:, v - 1]) for v in range(1, k))


def test_rotations_are_boosts_four_and_distinct():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = [apply_view(x, "rot", v) for v in range(4)]
    assert torch.equal(views[1], torch.rot90(x, 1, (2, 3))) and torch.equal(torch.rot90(views[3], 1, (2, 3)), x)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 4


def test_rotflip_is_the_eight_symmetries_of_the_square():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = [apply_view(x, "rotflip", v) for v in range(8)]
    assert all(torch.equal(views[v], torch.rot90(x, v, (2, 3))) for v in range(4))
    assert torch.equal(views[5], torch.flip(torch.rot90(x, 1, (2, 3)), (3,)))
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8


def test_image_gradient_through_views_is_the_sum_of_each_views_adjoint():
    """What KRR-ST's step does with the support set's gradient (OuterStep.to_parameters): by hand for rot."""
    from ssdd.distill.engines.krr_engine import OuterStep

    torch.manual_seed(0)
    x = torch.randn(4, 1, 6, 6)
    step = OuterStep.__new__(OuterStep)
    step.x_s, step.v_s = x, torch.zeros(4, 3, 2)
    step.cfg = type("C", (), {"views": "rot"})()
    d_x, d_y = torch.randn(16, 1, 6, 6), torch.randn(16, 2)
    d_img, d_base, d_views = step.to_parameters(d_x, d_y)
    by_hand = sum(torch.rot90(d_x[v * 4:(v + 1) * 4], -v, (2, 3)) for v in range(4))
    assert torch.allclose(d_img, by_hand, atol=1e-6)
    assert torch.equal(d_base, d_y[:4]) and torch.equal(d_views[:, 1], d_y[8:12])


def test_approximation_network_fits_a_learnable_shift():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 6, generator=gen)
    mats = torch.randn(3, 6, 6, generator=gen) * 0.3
    vt = base.unsqueeze(1) + torch.einsum("vij,nj->nvi", mats, base)
    net, err = approx.fit(base, vt, hidden=32, steps=1500)
    scale = float((vt - base.unsqueeze(1)).pow(2).mean().sqrt())
    assert err < 0.2 * scale  # far better than "no shift"
    assert err == pytest.approx(approx.error(net, base, vt))


@pytest.fixture(scope="module")
def view_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("views")
    assert main(["run", "--preset", "demo", "--out", str(out), "--no-progress", "--until", "pretrain", *TINY,
                 "--set", "distill.views=rot"]) == 0
    return out


def _teacher(out):
    teacher, _ = encoder_from_artifact(out / "teacher.safetensors", "cpu")
    return teacher.eval()


def test_real_subset_view_targets_are_the_teachers_on_the_rotated_images(view_run):
    found = distilled_set.load(view_run / "distilled" / "random_subset.safetensors")
    assert found.views == "rot" and found.view_targets.shape == (20, 3, found.targets.shape[1])
    assert found.meta["view_targets_from"] == "teacher"
    source = load_dataset(view_run / "data" / "source_train.safetensors")
    index = random_index(len(source), 20, 0)
    assert found.meta["init_index"] == index.tolist()
    norm, teacher = Normalizer(*source.mean_std()), _teacher(view_run)
    with torch.no_grad():
        for v in range(1, 4):
            rotated = torch.rot90(source.images[index], v, (2, 3))  # rotate the real uint8 images, then normalise
            assert torch.allclose(found.view_targets[:, v - 1], teacher.features(norm(rotated)), atol=1e-5)


def test_krr_st_learns_its_view_targets_and_storage_counts_them(view_run):
    path = view_run / "distilled" / "krr_st.safetensors"
    found = distilled_set.load(path)
    assert found.meta["view_targets_from"] == "learned" and found.view_targets.shape[1] == 3
    start = distilled_set.load(view_run / "distilled" / "random_subset.safetensors")
    assert not torch.allclose(found.view_targets, start.view_targets)  # moved from the teacher's start
    m, d = found.targets.shape
    assert distilled_set.stored_numbers(path) == found.images.numel() + m * d + m * 3 * d
    images, targets = found.pairs()
    assert images.shape[0] == targets.shape[0] == 4 * m
    assert "heldout_check" in found.meta


def test_approx_store_round_trips_within_its_fitting_error(view_run, tmp_path):
    found = distilled_set.load(view_run / "distilled" / "krr_st.safetensors")
    net, err = approx.fit(found.targets, found.view_targets, hidden=8, steps=300)
    path = tmp_path / "approx.safetensors"
    meta = {**found.recorded, "view_approx_rmse": err}
    distilled_set.save_arrays(path, found.images, found.targets, meta, view_net=net)
    back = distilled_set.load(path)
    assert back.view_targets is None and back.view_net is not None
    rebuilt = back.all_view_targets()
    assert float((rebuilt - found.view_targets).pow(2).mean().sqrt()) == pytest.approx(err, rel=1e-4)
    m, d = found.targets.shape
    assert distilled_set.stored_numbers(path) == found.images.numel() + m * d + sum(t.numel() for t in net.values())


def test_a_set_with_views_and_no_view_targets_is_refused(view_run, tmp_path):
    found = distilled_set.load(view_run / "distilled" / "random_subset.safetensors")
    path = tmp_path / "bad.safetensors"
    with pytest.raises(Exception, match="view_targets"):
        distilled_set.save_arrays(path, found.images, found.targets, found.recorded)


def test_recipes_are_the_published_ones():
    cfg = Config().pretrain
    krr, mkdt, short = (pretrain_recipes.recipe(n, cfg) for n in ("krr_st", "mkdt", "short"))
    assert (krr.epochs, krr.lr, krr.weight_decay, krr.batch, krr.learned_lr) == (1000, 0.1, 1e-3, 256, False)
    assert (mkdt.epochs, mkdt.weight_decay, mkdt.schedule, mkdt.learned_lr) == (20, 1e-4, "constant", True)
    assert (short.epochs, short.lr) == (cfg.epochs, cfg.lr)


def test_recipe_choice_reads_no_test_split_and_is_recorded(view_run, tmp_path):
    """Several recipes: each encoder is chosen on the validation split of the in-domain target's train split.
    The test split is deleted first, so the choice cannot have read it; the evaluation rows then name the
    chosen recipe."""
    import json
    import shutil

    from ssdd import artifacts

    out = tmp_path / "choice"
    shutil.copytree(view_run, out)
    tests = list((out / "data").glob("target_*_test.safetensors"))
    saved = {p: p.read_bytes() for p in tests}
    for p in tests:
        p.unlink()
    choose = ["--set", "pretrain.recipes=[\"short\",\"mkdt\"]", "--set", "evaluate.validation=0.2"]
    assert main(["pretrain", "--preset", "demo", "--out", str(out), "--no-progress", *TINY,
                 "--set", "distill.views=rot", *choose]) == 0
    for name in ("krr_st", "random_subset"):
        meta = artifacts.read_meta(out / "encoders" / f"{name}.safetensors")
        assert set(meta["recipe_scores"]) == {"short", "mkdt"}
        assert meta["recipe"] == max(meta["recipe_scores"], key=meta["recipe_scores"].get)
        assert "validation split" in meta["recipe_chosen_on"]
    for p, data in saved.items():
        p.write_bytes(data)
    assert main(["evaluate", "--preset", "demo", "--out", str(out), "--no-progress", *TINY,
                 "--set", "distill.views=rot", *choose]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert {r["recipe"] for r in rows if r["method"] in ("krr_st", "random_subset")} <= {"short", "mkdt"}
    assert all("recipe" in r for r in rows if r["method"] in ("krr_st", "random_subset"))


def test_export_npz_and_import_keep_the_view_targets(view_run, tmp_path):
    from ssdd.interop import export_set, import_set

    src = view_run / "distilled" / "krr_st.safetensors"
    npz = export_set(src, "npz", tmp_path / "k.npz")
    back = distilled_set.load(import_set([npz], "npz", tmp_path / "back.safetensors"))
    found = distilled_set.load(src)
    assert back.views == "rot" and torch.equal(back.view_targets, found.view_targets)
    assert torch.equal(back.images, found.images) and torch.equal(back.targets, found.targets)
