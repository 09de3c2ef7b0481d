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


# ---- fine-tunes checkpoint mid-run ----------------------------------------------------

def test_a_stopped_finetune_resumes_to_the_same_model(tmp_path):
    import torch

    from ssdd.checkpoint import Checkpointer, Hooks
    from ssdd.config import EvaluateConfig
    from ssdd.data import ImageSet, Normalizer
    from ssdd.errors import Stopped
    from ssdd.evaluate.finetune import finetune
    from ssdd.models import build

    gen = torch.Generator().manual_seed(0)
    train = ImageSet(torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8, generator=gen), torch.arange(24) % 3)
    norm = Normalizer(*train.mean_std())
    torch.manual_seed(0)
    encoder = build({"arch": "convnet", "in_channels": 3, "image_size": 16, "widths": [4, 8], "out_dim": 0})
    cfg = EvaluateConfig(finetune_iters=12, finetune_batch=8)
    whole = finetune(encoder, train, norm, cfg, seed=1, progress=False)
    ckpt = Checkpointer(tmp_path, "ft", "fp", every=4, minutes=1e9)
    asked = iter(range(100))
    with pytest.raises(Stopped):  # a stop request at step 6 checkpoints there and stops
        finetune(encoder, train, norm, cfg, seed=1, progress=False,
                 hooks=Hooks(None, ckpt.save, ckpt.due, lambda: next(asked) == 5))
    assert ckpt.load()["step"] == 6
    resumed = finetune(encoder, train, norm, cfg, seed=1, progress=False, hooks=ckpt.hooks())
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


FINETUNE = ["--preset", "demo", "--no-progress", "--set", "teacher.epochs=1", "--set", "data.heldout=300",
            "--set", "distill.m=20", "--set", "evaluate.seeds=1", "--set", 'methods=["random_subset"]',
            "--set", 'evaluate.protocols=["finetune"]', "--set", "evaluate.finetune_fractions=[0.1]",
            "--set", "evaluate.finetune_iters=400", "--set", "evaluate.finetune_batch=16", "--set", "checkpoint_every=10",
            "--precision", "fp32"]


@pytest.mark.slow
def test_a_killed_finetune_resumes_to_the_same_result(tmp_path):
    import hashlib
    import json

    base = tmp_path / "base"
    assert main(["run", "--out", str(base), "--until", "pretrain", *FINETUNE]) == 0
    shutil.copytree(base, tmp_path / "killed")
    whole = subprocess.run([sys.executable, "-m", "ssdd", "run", "--out", str(base), *FINETUNE], capture_output=True,
                           text=True, timeout=600)  # a process like the killed one (same thread count)
    assert whole.returncode == 0, whole.stderr[-2000:]
    expected = json.loads((base / "results.json").read_text())
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ssdd", "run", "--out", str(out), *FINETUNE],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def intact_steps() -> list[int]:  # a record is written before its data: count a checkpoint once both are whole
        steps = []
        for record in out.glob("finetune-*.ckpt-*.json"):
            try:
                meta, data = json.loads(record.read_text()), record.with_suffix(".pt").read_bytes()
            except (OSError, ValueError):
                continue
            if hashlib.sha256(data).hexdigest() == meta["sha256"]:
                steps.append(int(meta["step"]))
        return steps

    deadline = time.monotonic() + 300
    while not intact_steps() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the fine-tune ended before its first checkpoint"
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    steps = intact_steps()  # the newest intact one is where the rerun resumes (a kill mid-write leaves the one before)
    assert steps and 0 < max(steps) < 400 and not (out / "results.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "ssdd", "run", "--out", str(out), *FINETUNE], capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from the checkpoint at step {max(steps)}" in resumed.stderr  # not from zero
    assert json.loads((out / "results.json").read_text()) == expected
    assert not list(out.glob("finetune-*.ckpt-*"))  # cleared once the unit's result is written
