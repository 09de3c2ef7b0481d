"""User mistakes: one-line error naming the file/option, exit code 2, no traceback, no partial artifact."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssdd.artifacts import save_tensors
from ssdd.cli import main


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if not line.startswith("[ssdd]")]


def assert_one_line_error(code, lines, needle):
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("ssdd: error:") and needle in lines[0], lines
    assert "Traceback" not in lines[0]


def no_artifacts(folder: Path) -> bool:
    return not folder.exists() or not any(p.suffix in (".safetensors", ".json", ".tmp") or p.name.endswith(".tmp")
                                          for p in folder.rglob("*"))


def test_unknown_preset(tmp_path, capsys):
    code, lines = run_cli(["run", "--preset", "nosuch", "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, lines, "unknown preset 'nosuch'")
    assert no_artifacts(tmp_path / "o")


def test_missing_source_file(tmp_path, capsys):
    out = tmp_path / "o"
    code, lines = run_cli(["prepare", "--out", str(out), "--set", f"data.source={tmp_path}/missing.safetensors"], capsys)
    assert_one_line_error(code, lines, "missing.safetensors")
    assert no_artifacts(out)


def test_wrong_image_shape(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    save_tensors(bad, {"images": torch.zeros(10, 1, 16, 16, dtype=torch.uint8)}, {"kind": "dataset"})
    out = tmp_path / "o"
    code, lines = run_cli(["prepare", "--out", str(out), "--set", f"data.source={bad}"], capsys)
    assert_one_line_error(code, lines, "expected 32x32")
    assert no_artifacts(out)


def test_not_a_safetensors_file(tmp_path, capsys):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    code, lines = run_cli(["prepare", "--out", str(tmp_path / "o"), "--set", f"data.source={bad}"], capsys)
    assert_one_line_error(code, lines, "garbage.safetensors")
    assert no_artifacts(tmp_path / "o")


def test_missing_upstream_artifact(tmp_path, capsys):
    code, lines = run_cli(["distill", "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, lines, "source_train.safetensors")


def test_output_folder_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    code, lines = run_cli(["run", "--out", str(f)], capsys)
    assert_one_line_error(code, lines, "is a file")


def test_bad_option_and_bad_override(tmp_path, capsys):
    code, lines = run_cli(["run", "--out", str(tmp_path), "--bogus"], capsys)
    assert_one_line_error(code, lines, "--bogus")
    code, lines = run_cli(["run", "--out", str(tmp_path / "o"), "--set", "distill.m=-1"], capsys)
    assert_one_line_error(code, lines, "distill.m must be positive")
    code, lines = run_cli(["run", "--out", str(tmp_path / "o"), "--until", "nowhere"], capsys)
    assert_one_line_error(code, lines, "--until")


def test_m_larger_than_source(tmp_path, capsys):
    small = tmp_path / "small.safetensors"
    from ssdd.data import ImageSet, save_dataset
    save_dataset(small, ImageSet(torch.randint(0, 255, (30, 1, 32, 32), dtype=torch.uint8)))
    out = tmp_path / "o"
    args = ["run", "--out", str(out), "--no-progress", "--set", f"data.source={small}", "--set", "data.heldout=5",
            "--set", "teacher.epochs=1", "--set", "distill.m=50", "--until", "distill"]
    code, lines = run_cli(args, capsys)
    assert_one_line_error(code, lines, "distill.m=50")
    assert not (out / "distilled" / "krr_st.safetensors").exists()


def test_console_script_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ssdd", "run", "--preset", "nosuch", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["", "prepare", "teacher", "distill", "pretrain", "evaluate", "report", "run",
                                     "demo", "compare", "diagnose", "info"])
def test_every_help_text_renders(command, capsys):
    from ssdd.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0 and "usage" in capsys.readouterr().out
