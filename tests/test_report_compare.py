"""The report and the comparison table state only what they compared."""

import csv
import json

import pytest
import torch

from ssdd import artifacts, distilled_set
from ssdd.compare import compare_table, write_compare
from ssdd.paper_table import read_paper_table
from ssdd.errors import UserError
from ssdd.report import heldout_markdown, results_markdown, write_report


def _rows(accs: dict[str, list[float]], target="cifar10", protocol="linear", fraction=0.01, group="convnet"):
    return [{"method": m, "target": target, "protocol": protocol, "label_fraction": fraction, "seed": s,
             "accuracy": a, "arch": group, "group": group} for m, values in accs.items() for s, a in enumerate(values)]


TIE = {"krr_st": [0.50, 0.52, 0.47], "random_subset": [0.49, 0.53, 0.47], "no_pretrain": [0.30, 0.31, 0.29]}


def test_report_not_compared_with_one_seed():
    md = results_markdown(_rows({"krr_st": [0.5], "random_subset": [0.4]}))
    assert "krr_st − random_subset" in md and "not compared (1 paired seed)" in md
    assert "within seed noise" not in md and "excludes zero" not in md and "Nothing was tested" in md


def test_report_not_compared_without_baseline():
    md = results_markdown(_rows({"krr_st": [0.5, 0.6, 0.55], "full_ssl": [0.7, 0.71, 0.69]}))
    assert "not compared" in md
    for conclusion in ("within seed noise", "beats", "trails", "excludes zero"):
        assert conclusion not in md


def test_report_states_tested_differences_only():
    md = results_markdown(_rows(TIE), interval_note="seeds vary the distillation's initial draw and label draws")
    assert "krr_st vs random_subset is within seed noise on cifar10" in md
    assert "random_subset − no_pretrain" in md and "no_pretrain − random_subset" not in md
    assert "excludes zero: random_subset − no_pretrain" in md or "random_subset − no_pretrain = +" in md
    assert "What the interval covers: seeds vary the distillation's initial draw and label draws." in md
    assert "MKDT" not in md and "KRR-ST against" not in md  # no fixed conclusion sentence


def test_report_method_order():
    rows = _rows({"b_method": [0.1, 0.2], "random_subset": [0.1, 0.2], "a_method": [0.3, 0.2]})
    header = next(line for line in results_markdown(rows).splitlines() if line.startswith("| target"))
    assert header.index("b_method") < header.index("random_subset") < header.index("a_method")
    header = next(line for line in results_markdown(rows, methods=["a_method"]).splitlines()
                  if line.startswith("| target"))
    assert header.index("a_method") < header.index("b_method")


def test_heldout_check_shows_no_copies():
    md = heldout_markdown({"init": 0.5, "distilled": 0.25, "other_random_subset": 0.5, "note": "fresh models"})
    numbers = [line for line in md.splitlines() if line.startswith("| ") and "0.5" in line]
    assert len(numbers) == 1 and "=" in numbers[0]  # one row for the two equal values
    assert "lower than its initial set's (50.0% of it)" in md and "fresh models" in md


def test_write_report_tolerates_missing_logs(tmp_path):
    artifacts.write_json(tmp_path / "results.json", _rows(TIE))
    artifacts.write_json(tmp_path / "pretrain_log.json", {"epoch_loss": {"krr_st/seed0": [1.0, 0.5, 0.25]}})
    path = write_report(tmp_path, methods=["random_subset", "krr_st"], interval_note="label draws",
                        heldout_check={"init": 1.0, "distilled": 0.8, "note": ""})
    text = path.read_text()
    assert "figures/pretrain_loss.png" in text and "distill_loss.png" not in text and "vs_initial" not in text
    assert "Does distillation optimise" in text and (tmp_path / "figures" / "pretrain_loss.png").stat().st_size > 1000


def test_write_report_reads_distilled_sets(tmp_path):
    artifacts.write_json(tmp_path / "results.json", _rows(TIE))
    images = torch.rand(3, 1, 8, 8)
    check = {"init": 0.4, "distilled": 0.3, "other_random_subset": 0.45, "note": "three fresh models"}
    for name, x, meta in (("krr_st", images + 0.1, {"losses": [3.0, 2.0, 1.0], "heldout_check": check}),
                          ("krr_st.seed1", images, {}), ("random_subset", images, {}),
                          ("kmeans", images, {"init_index": [0, 1, 2]})):
        distilled_set.save_arrays(tmp_path / "distilled" / f"{name}.safetensors", x, torch.zeros(3, 2),
                                  {"method": name, "init_index": [4, 1, 7], "image_space": "reference", **meta})
    text = write_report(tmp_path).read_text()
    assert "figures/distilled_vs_initial.png" in text and "figures/distill_loss.png" in text
    assert "kmeans_vs_initial" not in text and "seed1" not in text  # another start; a later seed
    assert "| distilled set | 0.3 |" in text and "three fresh models" in text and "(75.0% of it)" in text


def test_compare_writes_all_files_bold_best_and_marks_paper_rows(tmp_path):
    rows = _rows(TIE) + _rows({"krr_st": [0.9, 0.91], "random_subset": [0.8, 0.82]}, protocol="finetune", fraction=1.0)
    rows += _rows({"krr_st": [0.1, 0.1, 0.1]}, group="vgg11")  # a minority group: left out
    paper = tmp_path / "paper.csv"
    paper.write_text("method,target,protocol,label_fraction,accuracy\nkrr_st,cifar10,linear,0.01,99.5\n"
                     "mkdt,cifar10,linear,0.01,44.36\nmkdt,tiny,linear,0.01,3.87\n")
    md_path = write_compare(tmp_path / "cmp", rows, ["krr_st", "random_subset", "no_pretrain"], paper_table=paper,
                            wall_times={"krr_st": {"distill": 120.0, "pretrain": 30.0}, "random_subset": 5.0})
    for name in ("compare.md", "compare.csv", "compare.json", "compare.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    md = md_path.read_text()
    krr_row = next(line for line in md.splitlines() if line.startswith("| krr_st |"))
    assert "**49.7 ± 2.5 (+0.0 [" in krr_row  # best linear mean, with its paired difference
    rs_row = next(line for line in md.splitlines() if line.startswith("| random_subset |"))
    assert "(baseline)" in rs_row and "**81.0" not in rs_row
    paper_rows = [line for line in md.splitlines() if "(paper)" in line and line.startswith("|")]
    assert len(paper_rows) == 2 and all("**" not in line for line in paper_rows)
    assert "99.5" in paper_rows[0] and "44.4" in paper_rows[1]  # 99.5 beats everything, yet is not bold
    assert "1 paper entry matches no column" in md and "vgg11" in md
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data["group"] == "convnet"
    assert data["best"]["cifar10|linear|0.01"] == ["krr_st", "random_subset"]  # a tie: both are best
    assert data["cells"]["no_pretrain"]["cifar10|finetune|1"]["diff"] == "not compared"
    assert data["cells"]["random_subset"]["cifar10|linear|0.01"]["diff"] == "not compared"
    diff = data["cells"]["krr_st"]["cifar10|linear|0.01"]["diff"]
    assert diff["n_pairs"] == 3 and diff["lo"] < 0 < diff["hi"]
    with open(tmp_path / "cmp" / "compare.csv") as fh:
        table = list(csv.DictReader(fh))
    assert {r["source"] for r in table} == {"ours", "paper"}
    assert all(r["best"] == "no" for r in table if r["source"] == "paper")


def test_compare_table_not_compared_cells():
    table = compare_table(_rows({"krr_st": [0.5], "random_subset": [0.4]}), ["krr_st"])
    cell = table["cells"]["krr_st"]["cifar10|linear|0.01"]
    assert cell["diff"] == "not compared" and cell["diff_reason"] == "1 paired seed"
    assert table["methods"] == ["krr_st", "random_subset"]
    table = compare_table(_rows({"krr_st": [0.5, 0.6]}), ["krr_st"])
    assert table["cells"]["krr_st"]["cifar10|linear|0.01"]["diff_reason"] == "no baseline result"


@pytest.mark.parametrize("content, problem", [
    ("method,target,accuracy\nkrr_st,cifar10,40\n", "missing columns protocol, label_fraction"),
    ("method,target,protocol,label_fraction,accuracy\nkrr_st,cifar10,linear,one,40\n", "not a number"),
    ("method,target,protocol,label_fraction,accuracy\nkrr_st,cifar10,linear,5,40\n", "not in (0, 1]"),
    ("method,target,protocol,label_fraction,accuracy\nkrr_st,cifar10,linear,0.05,0.4\n", "fractions"),
    ("method,target,protocol,label_fraction,accuracy\n", "no rows"),
])
def test_bad_paper_table(tmp_path, content, problem):
    path = tmp_path / "paper.csv"
    path.write_text(content)
    with pytest.raises(UserError) as err:
        read_paper_table(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and problem in msg
    assert "method,target,protocol,label_fraction,accuracy" in msg
    with pytest.raises(UserError):
        write_compare(tmp_path / "out", _rows(TIE), None, paper_table=path)
    assert not (tmp_path / "out" / "compare.md").exists()
    with pytest.raises(UserError, match="file not found"):
        read_paper_table(tmp_path / "missing.csv")
