"""The whole pipeline on bundled data, small enough for CI; checks the artifact contract."""

import json

import pytest

from ssdd.artifacts import load_distilled, load_encoder
from ssdd.cli import main

SMALL = ["--set", "teacher.epochs=1", "--set", "distill.steps=15", "--set", "distill.pool_max_age=5",
         "--set", "pretrain.epochs=5", "--set", "evaluate.finetune_iters=5", "--set", "evaluate.linear_draws=2",
         "--set", "distill.check_models=2", "--set", "data.heldout=300"]


@pytest.mark.slow
def test_demo_pipeline_contract(tmp_path, caplog):
    caplog.set_level("INFO", logger="ssdd")
    out = tmp_path / "demo"
    assert main(["run", "--preset", "demo", "--out", str(out), "--no-progress", *SMALL]) == 0
    images, targets, meta = load_distilled(out / "distilled.safetensors")
    assert images.shape == (100, 1, 32, 32) and targets.shape[0] == 100
    assert meta["image_space"] == "normalized" and meta["steps"] == 15 and meta["seed"] == 0
    for key in ("source", "teacher", "mean", "std", "ssdd_version"):
        assert key in meta
    for method in ("krr_st", "random_subset", "no_pretrain", "full_ssl"):
        _, emeta = load_encoder(out / "encoders" / f"{method}.safetensors")
        assert "arch" in emeta["model_spec"]
    rows = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in rows} == {"krr_st", "random_subset", "no_pretrain", "full_ssl"}
    assert {(r["protocol"], r["label_fraction"]) for r in rows} == {
        ("linear", 0.01), ("linear", 0.1), ("linear", 1.0), ("finetune", 0.1), ("finetune", 1.0)}
    assert {r["seed"] for r in rows} == {0, 1, 2} and all(0 <= r["accuracy"] <= 1 for r in rows)
    check = json.loads((out / "distill_check.json").read_text())
    assert {"heldout_loss_init", "heldout_loss_distilled", "heldout_loss_random_subset"} <= set(check)
    report = (out / "report.md").read_text()
    for png in ("distilled_vs_initial.png", "distill_loss.png", "pretrain_loss.png"):
        assert f"figures/{png}" in report and (out / "figures" / png).stat().st_size > 1000
    assert "krr_st − random_subset" in report
    for stage in ("prepare", "teacher", "distill", "pretrain", "evaluate", "report"):
        assert (out / f"config.{stage}.json").is_file()

    # A second run with the same config skips every stage; a changed distill config redoes distill onward.
    caplog.clear()
    assert main(["run", "--preset", "demo", "--out", str(out), "--no-progress", *SMALL]) == 0
    assert caplog.text.count("skipped") == 6
    caplog.clear()
    assert main(["run", "--preset", "demo", "--out", str(out), "--no-progress", "--until", "distill", *SMALL,
                 "--set", "distill.steps=16"]) == 0
    log = caplog.text
    assert log.count("skipped") == 2 and "distill  done" in log
    assert load_distilled(out / "distilled.safetensors")[2]["steps"] == 16
