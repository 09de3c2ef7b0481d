"""Kill a distillation with SIGKILL at several points (and once with SIGTERM), resume each time,
and compare the final artifact byte for byte with an uninterrupted run."""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssdd.cli import main

SETTINGS = ["--preset", "demo", "--no-progress", "--set", "teacher.epochs=1", "--set", "data.heldout=300",
            "--set", "distill.m=20", "--set", "distill.krr_st.steps=36", "--set", "distill.batch=64",
            "--set", "distill.krr_st.pool_max_age=6", "--set", "checkpoint_every=1", "--set", "distill.krr_st.check_models=1",
            "--set", "distill.krr_st.check_batches=1", "--set", "evaluate.seeds=1", "--set", 'methods=["krr_st"]']


def distill_cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "ssdd", "distill", "--out", str(out), *SETTINGS]


def newest_step(out: Path) -> int:
    steps = [int(p.stem.rsplit("-", 1)[1]) for p in out.glob("distill-krr_st.ckpt-*.json")]
    return max(steps, default=-1)


def run_until_step_then_signal(out: Path, step: int, sig: int, extra_delay: float) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(distill_cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while newest_step(out) < step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(extra_delay)  # land anywhere: mid-step, mid-write
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume") / "base"
    assert main(["run", "--out", str(base), "--until", "teacher", *SETTINGS]) == 0
    reference = base.parent / "reference"
    shutil.copytree(base, reference)
    subprocess.run(distill_cmd(reference), check=True, capture_output=True)
    return base, (reference / "distilled" / "krr_st.safetensors").read_bytes()


@pytest.mark.slow
def test_sigkill_at_five_points_then_resume_is_byte_identical(prepared):
    base, expected = prepared
    out = base.parent / "killed"
    shutil.copytree(base, out)
    for step, delay in ((2, 0.0), (8, 0.05), (14, 0.11), (21, 0.0), (29, 0.07)):
        result = run_until_step_then_signal(out, step, signal.SIGKILL, delay)
        assert result.returncode == -signal.SIGKILL
        assert not (out / "distilled" / "krr_st.safetensors").exists() or newest_step(out) >= 36
    assert len(list(out.glob("distill-krr_st.ckpt-*.pt"))) <= 2  # only the last two are kept
    subprocess.run(distill_cmd(out), check=True, capture_output=True)
    assert (out / "distilled" / "krr_st.safetensors").read_bytes() == expected
    assert not list(out.glob("distill-krr_st.ckpt-*")) and not list(out.rglob(".*.tmp"))


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly_then_resumes(prepared):
    base, expected = prepared
    out = base.parent / "terminated"
    shutil.copytree(base, out)
    result = run_until_step_then_signal(out, 10, signal.SIGTERM, 0.03)
    assert result.returncode == 130
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ssdd: distill-krr_st stopped at step") and "rerun the same command to resume" in last
    assert not (out / "distilled" / "krr_st.safetensors").exists()
    subprocess.run(distill_cmd(out), check=True, capture_output=True)
    assert (out / "distilled" / "krr_st.safetensors").read_bytes() == expected


def test_checkpoint_of_another_config_is_refused(prepared, capsys):
    base, _ = prepared
    out = base.parent / "otherconfig"
    shutil.copytree(base, out)
    run_until_step_then_signal(out, 3, signal.SIGKILL, 0.0)
    code = main(["distill", "--out", str(out), *SETTINGS, "--set", "distill.krr_st.lr_images=0.5"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "different config" in err
