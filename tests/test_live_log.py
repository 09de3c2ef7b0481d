"""``--log tensorboard``: a tiny demo run's curves read back with TensorBoard's own reader, equal to the numbers
the artifacts keep; values reach the event file while the writer is still open (live, not at the end); the
learned lr of trajectory matching; the picture grid; the one-line refusal without the package; no
fingerprint moves."""

import json
import sys
import time

import numpy as np
import pytest
import torch

from ssdd import live_log
from ssdd.artifacts import load_encoder
from ssdd.cli import main
from ssdd.data import ImageSet, Normalizer
from ssdd.distill.engines.experts import ExpertsConfig
from ssdd.distill.methods.mkdt import MkdtConfig, distill_mkdt, train_experts
from ssdd.distill.registry import DistillContext
from ssdd.distilled_set import load_arrays
from ssdd.loss_log import StepLog
from ssdd.models import build
from ssdd.run import Run
from ssdd.settings import DistillConfig, load_config
from ssdd.teacher import FeatureExtractor

EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator

TINY_DEMO = ["data.size=16", "data.heldout=8", "teacher.epochs=1", "teacher.batch=16", "teacher.projector=[16, 16]", "teacher.model.widths=[8, 8]", "model.widths=[4, 8]",
             "distill.m=10", "distill.batch=16", "distill.krr_st.steps=4", "distill.krr_st.pool_size=2",
             "distill.krr_st.pool_max_age=3", "distill.krr_st.check_models=1", "distill.krr_st.check_batches=1",
             "pretrain.epochs=2", "pretrain.batch=8", "evaluate.seeds=1", 'evaluate.protocols=["finetune"]',
             "evaluate.finetune_fractions=[1.0]", "evaluate.finetune_iters=3", "evaluate.finetune_batch=8",
             'methods=["krr_st", "random_subset"]', "precision=fp32"]


def events(folder) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def curve(acc: EventAccumulator, tag: str) -> tuple[list[int], list[float]]:
    points = acc.Scalars(tag)
    return [p.step for p in points], [p.value for p in points]


def test_a_tiny_demo_run_writes_every_curve_tensorboard_reads(tmp_path):
    """The demo preset on 48 random 16-px images (source and target alike), a few steps of everything."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tiny.npz", x=rng.integers(0, 256, (48, 16, 16, 3), dtype=np.uint8), y=np.arange(48) % 4)
    data = [f"data.source=npz:{tmp_path / 'tiny.npz'}", f"data.targets=[\"npz:{tmp_path / 'tiny.npz'}\"]"]
    out = tmp_path / "demo"
    args = ["run", "--preset", "demo", "--out", str(out), "--no-progress", "--device", "cpu", "--log", "tensorboard"]
    assert main(args + [x for pair in TINY_DEMO + data for x in ("--set", pair)]) == 0
    acc = events(out / "tb")
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    _, teacher_meta = load_encoder(out / "teacher.safetensors")
    krr = load_arrays(out / "distilled" / "krr_st.safetensors")[2]
    pretrain = json.loads((out / "pretrain_log.json").read_text())["epoch_loss"]
    # each curve is the one the artifacts keep (TensorBoard stores float32)
    steps, values = curve(acc, "teacher/loss")
    assert steps == list(range(len(teacher_meta["loss_curve"])))
    assert values == pytest.approx(teacher_meta["loss_curve"], rel=1e-6)
    steps, values = curve(acc, "distill/krr_st/seed0/loss")
    assert steps == [1, 2, 3, 4] and values == pytest.approx(krr["losses"], rel=1e-6)
    for name in ("distilled", "init", "other_random_subset"):
        assert curve(acc, f"distill/krr_st/seed0/heldout/{name}") == ([4], [pytest.approx(krr["heldout_check"][name], rel=1e-6)])
    for method in ("krr_st", "random_subset"):
        steps, values = curve(acc, f"pretrain/{method}/seed0/loss")
        assert steps == [1, 2] and values == pytest.approx(pretrain[f"{method}/seed0"], rel=1e-6)
        steps, values = curve(acc, f"finetune/{method}/tiny/seed0/labels1/loss")
        assert steps == [1, 2, 3] and all(v > 0 for v in values)
    assert not any(tag.startswith("distill/random_subset") for tag in scalars)  # a subset has no loop
    # a picture of the synthetic set after every step here (4 steps: fewer than ~20 pictures a run)
    assert images == {"distill/krr_st/seed0/synthetic"}
    pictures = acc.Images("distill/krr_st/seed0/synthetic")
    assert [p.step for p in pictures] == [1, 2, 3, 4]
    assert (pictures[0].height, pictures[0].width) == (3 * 18, 4 * 18)  # 10 images of 16 px: 3 rows of 4, 1 px apart


def test_values_reach_the_event_file_while_the_writer_is_open(tmp_path):
    """Live: a loop's losses are in the file seconds after they are read, with the writer still open, and
    so are those read later."""
    def seen(n: int) -> bool:
        deadline = time.monotonic() + 5 * live_log.FLUSH_SECS
        while time.monotonic() < deadline:
            acc = events(tmp_path)
            if "distill/x/seed0/loss" in acc.Tags()["scalars"] and len(acc.Scalars("distill/x/seed0/loss")) >= n:
                return True
            time.sleep(0.2)
        return False

    with live_log.opened("tensorboard", tmp_path), live_log.scope("distill/x/seed0"):
        log = StepLog([], lambda step, floats, _: floats[0], "cpu", tag="loss")
        log.add(1, [torch.tensor(0.5)])
        assert seen(1)
        for step in range(2, 4):
            log.add(step, [torch.tensor(0.5 * step)])
        assert seen(3)
        assert curve(events(tmp_path), "distill/x/seed0/loss") == ([1, 2, 3], [0.5, 1.0, 1.5])
    assert not live_log.active()  # closed at the end of the block


def test_trajectory_matching_logs_its_learned_lr(tmp_path):
    gen = torch.Generator().manual_seed(0)
    source = ImageSet(torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=gen))
    spec = {"arch": "convnet", "in_channels": 1, "image_size": 8, "widths": [4, 8], "norm": "instance", "pool": "gap",
            "out_dim": 6}
    torch.manual_seed(0)
    teacher = FeatureExtractor(build({**spec, "out_dim": 0, "widths": [6, 6], "norm": "batch"})).eval()
    cfg = DistillConfig(m=8, experts=ExpertsConfig(count=2, epochs=3, batch=16, lr=0.05),
                        mkdt=MkdtConfig(iterations=3, syn_steps=2, span=1, max_start_epoch=2, lr_lr=1e-3, batch_syn=4))
    ctx = DistillContext(source=source, heldout=None, teacher=teacher, norm=Normalizer(*source.mean_std()), spec=spec,
                         cfg=cfg, seed=0, init_index=torch.arange(8), device="cpu", progress=False)
    ctx.prep = {"experts": train_experts(ctx)}
    with live_log.opened("tensorboard", tmp_path), live_log.scope("distill/mkdt/seed0"):
        result = distill_mkdt(ctx)
    acc = events(tmp_path)
    assert curve(acc, "distill/mkdt/seed0/lr") == ([0, 1, 2], pytest.approx(result.meta["lr_curve"], rel=1e-6))
    assert curve(acc, "distill/mkdt/seed0/loss")[1] == pytest.approx(result.meta["losses"], rel=1e-6)
    assert [p.step for p in acc.Images("distill/mkdt/seed0/synthetic")] == [1, 2, 3]


def test_the_grid_puts_image_i_at_row_i_div_cols_column_i_mod_cols():
    images = torch.stack([torch.full((1, 2, 3), i / 10) for i in range(5)])  # 5 gray 2x3 images
    picture = live_log.grid(images)
    assert picture.shape == (3, 2 * 4, 3 * 5)  # 2 rows of 3, each image framed by 1 px
    for i in range(5):
        r, c = divmod(i, 3)
        assert torch.all(picture[:, r * 4 + 1:r * 4 + 3, c * 5 + 1:c * 5 + 4] == i / 10)
    assert torch.all(picture[:, 4 + 1:4 + 3, 2 * 5 + 1:2 * 5 + 4] == 1.0)  # the empty sixth cell is white


def test_without_tensorboard_one_line_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were missing
    assert main(["run", "--out", str(tmp_path / "x"), "--log", "tensorboard", "--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'ssdd[tb]'" in err
    assert not (tmp_path / "x").exists()  # refused before any work


def test_logging_is_in_no_fingerprint():
    plain = Run(load_config("demo", {"precision": "fp32"}), "/nonexistent/a", device="cpu", progress=False)
    logged = Run(load_config("demo", {"precision": "fp32", "log": "tensorboard", "log_images_every": "7"}),
                 "/nonexistent/a", device="cpu", progress=False)
    for stage in ("prepare", "teacher", "distill", "pretrain", "evaluate"):
        assert [u.fp for u in plain.plan.stage_units(stage)] == [u.fp for u in logged.plan.stage_units(stage)]
        assert plain.plan.units.stage(stage, plain.plan.stage_units(stage)) == \
            logged.plan.units.stage(stage, logged.plan.stage_units(stage))
