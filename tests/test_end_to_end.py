"""The whole pipeline on bundled data, small enough for CI; checks the artifact contract."""

import json

import pytest

from ssdd.artifacts import load_encoder
from ssdd.distilled_set import load_arrays
from ssdd.cli import main

SMALL = ["--set", "teacher.epochs=1", "--set", "distill.krr_st.steps=15", "--set", "distill.krr_st.pool_max_age=5",
         "--set", "pretrain.epochs=5", "--set", "evaluate.finetune_iters=5", "--set", "evaluate.linear_draws=2",
         "--set", "distill.krr_st.check_models=2", "--set", "data.heldout=300", "--set", "evaluate.seeds=2",
         "--set", "evaluate.linear_c_grid=[1.0]"]


@pytest.mark.slow
def test_demo_pipeline_contract(tmp_path, caplog):
    caplog.set_level("INFO", logger="ssdd")
    out = tmp_path / "demo"
    assert main(["run", "--preset", "demo", "--out", str(out), "--no-progress", *SMALL]) == 0
    images, targets, meta = load_arrays(out / "distilled" / "krr_st.safetensors")
    assert images.shape == (100, 1, 32, 32) and targets.shape[0] == 100
    assert meta["image_space"] == "normalized" and meta["steps"] == 15 and meta["seed"] == 0
    for key in ("source", "teacher", "mean", "std", "ssdd_version", "fingerprint", "init_index", "heldout_check"):
        assert key in meta
    # seeds vary the distillation: seed 1 starts from another draw, and random_subset is each seed's start
    meta1 = load_arrays(out / "distilled" / "krr_st.seed1.safetensors")[2]
    assert meta1["init_index"] != meta["init_index"]
    for k, m in ((0, meta), (1, meta1)):
        name = "random_subset" + (f".seed{k}" if k else "")
        assert load_arrays(out / "distilled" / f"{name}.safetensors")[2]["init_index"] == m["init_index"]
    for method in ("krr_st", "krr_st.seed1", "random_subset", "no_pretrain", "full_ssl"):
        _, emeta = load_encoder(out / "encoders" / f"{method}.safetensors")
        assert "arch" in emeta["model_spec"]
    rows = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in rows} == {"krr_st", "random_subset", "no_pretrain", "full_ssl"}
    assert {(r["protocol"], r["label_fraction"]) for r in rows} == {
        ("linear", 0.01), ("linear", 0.05), ("linear", 0.1), ("linear", 1.0), ("finetune", 0.1), ("finetune", 1.0)}
    assert {r["seed"] for r in rows} == {0, 1} and all(0 <= r["accuracy"] <= 1 for r in rows)
    report = (out / "report.md").read_text()
    for png in ("distilled_vs_initial.png", "pretrain_loss.png"):
        assert f"figures/{png}" in report and (out / "figures" / png).stat().st_size > 1000
    assert "krr_st − random_subset" in report and "held-out" in report.lower()
    for stage in ("prepare", "teacher", "distill", "pretrain", "evaluate", "report"):
        assert (out / f"config.{stage}.json").is_file()

    # A second run with the same config skips every stage; a changed distill config redoes distill onward.
    caplog.clear()
    assert main(["run", "--preset", "demo", "--out", str(out), "--no-progress", *SMALL]) == 0
    assert caplog.text.count("skipped") == 6
    caplog.clear()
    assert main(["run", "--preset", "demo", "--out", str(out), "--no-progress", "--until", "distill", *SMALL,
                 "--set", "distill.krr_st.steps=16"]) == 0
    log = caplog.text
    assert log.count("skipped") == 2 and "distill  done" in log
    assert "random_subset seed 0: exists" in log  # only the changed method is redone
    assert load_arrays(out / "distilled" / "krr_st.safetensors")[2]["steps"] == 16
