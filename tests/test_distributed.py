"""Data parallelism: N gloo processes on CPU give what one process gives with the same global batch
(KRR-ST outer steps, Barlow Twins steps, BatchNorm over the global batch, the whole pipeline's
results), rank 0 alone writes, and the run folder's lock refuses a second job."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssdd import distributed
from ssdd.config import ModelConfig, TeacherConfig
from ssdd.data import ImageSet, Normalizer
from ssdd.distill import distill_krr_st
from ssdd.models.global_norm import to_global
from ssdd.teacher.train import train_barlow_twins
from test_distill import context, setup
from test_methods import tiny_args, tiny_npz

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(autouse=True)
def one_thread():
    """Each rank runs one thread; so does the single-process reference (the same reduction order
    inside each op). The thread count is restored: later tests compare processes of the default count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn_name: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.setup("cpu")
    try:
        torch.save(globals()[fn_name](), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def in_processes(fn_name: str, world: int = 2) -> list:
    """Run ``fn_name()`` in ``world`` gloo processes; each rank's return value."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, _free_port(), fn_name, out), nprocs=world)
        return [torch.load(f"{out}/rank{r}.pt", weights_only=True) for r in range(world)]


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    err = ((a - b).norm() / b.norm()).item()
    assert err <= rel, f"relative difference {err:.2e} > {rel:g}"


# ---- the collectives' arithmetic ------------------------------------------------------

def test_shares_cover_the_batch_once_in_order():
    for n, world in ((15, 2), (16, 4), (3, 4), (1024, 3)):
        parts = [list(range(n))[distributed.share(n, r, world)] for r in range(world)]
        assert sum(parts, []) == list(range(n)) and max(map(len, parts)) - min(map(len, parts)) <= 1


TEACHER_BATCHES: list[int] = []


class CountingTeacher(torch.nn.Module):
    """The test teacher, recording the batch sizes it sees (which share each rank computed)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        TEACHER_BATCHES.append(len(x))
        return self.inner(x)


def krr_st_run() -> dict:
    source, teacher, norm, cfg = setup()
    cfg.batch = 15  # uneven shares: 8 + 7
    cfg.krr_st.ridge = 1e-2  # well conditioned: at 1e-6 float noise alone (1 vs 2 threads) moves this tiny problem far
    cfg.krr_st.fold_bn = False  # the teacher module itself runs (and counts)
    TEACHER_BATCHES.clear()
    result = distill_krr_st(context(source, CountingTeacher(teacher), norm, cfg, seed=3))
    outer = [n for n in TEACHER_BATCHES if n != len(source)]  # not the initial targets of the whole source
    return {"images": result.images, "targets": result.targets, "losses": torch.tensor(result.losses),
            "teacher_batches": torch.tensor(outer)}


def test_krr_st_two_processes_match_one_with_the_same_global_batch():
    single = krr_st_run()
    ranks = in_processes("krr_st_run")
    for rank in ranks:
        assert_close(rank["images"], single["images"])
        assert_close(rank["targets"], single["targets"])
        assert_close(rank["losses"], single["losses"])
    assert torch.equal(ranks[0]["images"], ranks[1]["images"])  # replicated exactly, not only close
    # the work was split: each rank's teacher saw its share of each global batch of 15
    assert set(single["teacher_batches"].tolist()) == {15}
    assert set(ranks[0]["teacher_batches"].tolist()) == {8} and set(ranks[1]["teacher_batches"].tolist()) == {7}


def barlow_run() -> dict:
    gen = torch.Generator().manual_seed(1)
    data = ImageSet(torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=gen))
    # SGD: the conv biases before BatchNorm have a zero gradient up to float noise, which AdamW would
    # blow up to full-size steps (the biases then differ by 1e-2 between any two reduction orders)
    cfg = TeacherConfig(model=ModelConfig(widths=[8, 8], pool="gap", norm="batch"), epochs=1, batch=18,
                        optimizer="sgd", lr=0.005, projector=[16, 16])
    result = train_barlow_twins(data, Normalizer(*data.mean_std()), cfg, seed=4, progress=False, data_parallel=True)
    state = [v.reshape(-1) for v in result.encoder.state_dict().values() if v.is_floating_point()]
    return {"weights": torch.cat(state), "losses": torch.tensor(result.losses)}


def test_barlow_twins_two_processes_match_one_with_the_same_global_batch():
    single = barlow_run()
    ranks = in_processes("barlow_run")
    assert len(single["losses"]) == 2
    for rank in ranks:  # the whole encoder as one vector: single tensors such as a conv bias before
        # BatchNorm (zero gradient up to float noise) differ beyond 1e-5 between 1 and 2 threads already
        assert_close(rank["weights"], single["weights"])
        assert_close(rank["losses"], single["losses"])
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])


def global_norm_grads() -> dict:
    torch.manual_seed(0)
    x = torch.randn(10, 3, 4, 4, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(3).double()
    to_global(bn)
    mine = x[distributed.share(len(x))].clone().requires_grad_(True)
    out = distributed.gather_keep_grad(bn(mine), len(x))
    (out * torch.arange(out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
    distributed.sum_gradients_(list(bn.parameters()))
    full = torch.zeros_like(x)
    full[distributed.share(len(x))] = mine.grad
    distributed.all_reduce_sum_([full])
    return {"x_grad": full, "w_grad": bn.weight.grad, "running_var": bn.running_var, "out": out.detach()}


def test_global_batchnorm_equals_batchnorm_on_the_whole_batch():
    torch.manual_seed(0)
    x = torch.randn(10, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    bn = torch.nn.BatchNorm2d(3).double()
    out = bn(x)
    (out * torch.arange(out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
    for rank in in_processes("global_norm_grads"):
        assert_close(rank["out"], out.detach(), 1e-12)
        assert_close(rank["x_grad"], x.grad, 1e-12)
        assert_close(rank["w_grad"], bn.weight.grad, 1e-12)
        assert_close(rank["running_var"], bn.running_var, 1e-12)


# ---- the whole pipeline under torchrun ------------------------------------------------

def _run(cmd: list[str], env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, **kw)


@pytest.mark.slow
def test_torchrun_pipeline_gives_the_single_process_results(tmp_path):
    src = tiny_npz(tmp_path / "src.npz")
    # well-conditioned settings (see the unit tests above): otherwise float noise alone, e.g. 1 vs 2
    # threads, moves the sets far more and hides what this test checks
    args = tiny_args(src, [src], ["random_subset", "krr_st", "no_pretrain"], seeds=2) + [
        "--set", "teacher.optimizer=sgd", "--set", "teacher.lr=0.005", "--set", "distill.krr_st.ridge=0.01",
        "--precision", "fp32"]  # bf16 rounds a share's conv differently from the whole batch's
    one = _run([sys.executable, "-m", "ssdd", "run", "--out", str(tmp_path / "one"), "--device", "cpu", *args])
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
                "-m", "ssdd", "run", "--out", str(tmp_path / "two"), "--device", "cpu", *args])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "distributed: 2 ranks (gloo)" in two.stderr
    rows1 = json.loads((tmp_path / "one" / "results.json").read_text())
    rows2 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert len(rows1) == len(rows2) > 0
    for a, b in zip(rows1, rows2):
        assert {k: v for k, v in a.items() if k != "accuracy"} == {k: v for k, v in b.items() if k != "accuracy"}
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-6)
    from ssdd import distilled_set
    for name in ("krr_st.safetensors", "krr_st.seed1.safetensors"):
        x1, y1, _ = distilled_set.load_arrays(tmp_path / "one" / "distilled" / name)
        x2, y2, _ = distilled_set.load_arrays(tmp_path / "two" / "distilled" / name)
        assert_close(x2, x1, 1e-4)  # after a 1-epoch teacher trained in two processes too
        assert_close(y2, y1, 1e-4)
    leftovers = [p.name for p in (tmp_path / "two").rglob("*") if "scratch" in p.name or p.name.endswith(".tmp")]
    assert not leftovers


# ---- one writer per folder ------------------------------------------------------------

def _hold_in_another_process(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from ssdd import folder_lock\n"
        f"with folder_lock.hold({str(folder)!r}):\n    print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_held_folder_refuses_a_second_job_in_one_line_until_its_holder_dies(tmp_path, capsys):
    from ssdd.cli import main

    src = tiny_npz(tmp_path / "src.npz")
    args = ["run", "--out", str(tmp_path / "run"), "--until", "prepare", *tiny_args(src, [src], ["random_subset"])]
    holder = _hold_in_another_process(tmp_path / "run")
    try:
        code = main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and f"another ssdd job (pid {holder.pid})" in err[-1]
        assert "Traceback" not in "\n".join(err)
        assert not (tmp_path / "run" / "data").exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs in the holder
        holder.wait()
    assert main(args) == 0  # the OS released the killed job's lock: nothing stale to delete


@pytest.mark.slow
def test_two_jobs_on_one_folder_the_second_refused_the_first_intact(tmp_path):
    src = tiny_npz(tmp_path / "src.npz", n=96)
    out = tmp_path / "run"
    args = tiny_args(src, [src], ["random_subset", "krr_st"], seeds=1) + ["--set", "distill.krr_st.steps=60"]
    first = subprocess.Popen([sys.executable, "-m", "ssdd", "run", "--out", str(out), *args],
                             stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in first.stderr:  # wait until the first job is past preparation, holding the folder
            lines.append(line)
            if "prepare  done" in line:
                break
        second = _run([sys.executable, "-m", "ssdd", "run", "--out", str(out), *args])
        assert second.returncode == 2
        assert second.stderr.strip().splitlines()[-1].startswith("ssdd: error: --out")
        assert "another ssdd job (pid" in second.stderr
        rest = first.stderr.read()
        assert first.wait(timeout=900) == 0, (lines + [rest])[-20:]
    finally:
        if first.poll() is None:
            first.kill()
    rows = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in rows} == {"random_subset", "krr_st"}


# ---- MKDT's experts: split over the ranks ---------------------------------------------

def experts_run() -> dict:
    from test_mkdt import make_ctx

    from ssdd.distill.methods.mkdt import train_experts
    import ssdd.distill.engines.experts as experts

    trained = []
    original = experts.train_expert

    def counting(ctx, k, *args):
        trained.append(k)
        return original(ctx, k, *args)

    experts.train_expert = counting
    try:
        out = train_experts(make_ctx(experts={"count": 3, "epochs": 2, "batch": 8}))
    finally:
        experts.train_expert = original
    return {**out, "trained": torch.tensor(trained)}


def test_experts_split_over_ranks_give_the_single_process_trajectories():
    single = experts_run()
    ranks = in_processes("experts_run")
    assert single["trained"].tolist() == [0, 1, 2]
    assert ranks[0]["trained"].tolist() == [0, 2] and ranks[1]["trained"].tolist() == [1]  # k on rank k mod 2
    for rank in ranks:
        assert rank["trajectories"].shape == single["trajectories"].shape == (3, 3, single["trajectories"].shape[2])
        assert_close(rank["trajectories"], single["trajectories"], 1e-6)
        assert_close(rank["epoch1_loss"], single["epoch1_loss"], 1e-6)


def mkdt_run() -> dict:
    from test_mkdt import make_ctx

    from ssdd.distill.methods.mkdt import distill_mkdt, train_experts

    experts = train_experts(make_ctx(experts={"count": 2, "epochs": 3, "batch": 8}))
    ctx = make_ctx(prep={"experts": experts}, experts={"count": 2, "epochs": 3, "batch": 8},
                   mkdt={"iterations": 4, "batch_syn": 5})  # minibatches of 5: shares of 3 and 2
    ctx.spec = {**ctx.spec, "norm": "instance"}
    out = distill_mkdt(ctx)
    return {"images": out.images, "targets": out.targets, "lr": torch.tensor(out.lr), "world": torch.tensor(distributed.world())}


def test_trajectory_matching_two_processes_match_one():
    single = mkdt_run()
    ranks = in_processes("mkdt_run")
    assert single["world"] == 1 and ranks[0]["world"] == ranks[1]["world"] == 2
    for rank in ranks:
        assert_close(rank["images"], single["images"])
        assert_close(rank["targets"], single["targets"])
        assert_close(rank["lr"], single["lr"])
    assert torch.equal(ranks[0]["images"], ranks[1]["images"])


# ---- a multi-rank run stops together and resumes exactly ------------------------------

def krr_st_stop_then_resume() -> dict:
    from ssdd.checkpoint import Checkpointer, Hooks
    from ssdd.errors import Stopped

    source, teacher, norm, cfg = setup()
    cfg.krr_st.ridge = 1e-2
    folder = Path(os.environ["SSDD_TEST_CKPT"])
    ckpt = Checkpointer(folder, "krr", "fp", every=0, minutes=1e9)
    asked = iter(range(100))
    only_rank1_asks = lambda: distributed.rank() == 1 and next(asked) == 2  # noqa: E731 (after step 3)
    stopped_at = -1
    try:
        distill_krr_st(context(source, teacher, norm, cfg, seed=3, hooks=Hooks(None, ckpt.save, ckpt.due, only_rank1_asks)))
    except Stopped as err:
        stopped_at = err.step
    distributed.barrier()  # rank 0's checkpoint is on disk for everyone
    result = distill_krr_st(context(source, teacher, norm, cfg, seed=3, hooks=ckpt.hooks()))
    return {"images": result.images, "targets": result.targets, "stopped_at": torch.tensor(stopped_at)}


def krr_st_uninterrupted() -> dict:
    source, teacher, norm, cfg = setup()
    cfg.krr_st.ridge = 1e-2
    result = distill_krr_st(context(source, teacher, norm, cfg, seed=3))
    return {"images": result.images, "targets": result.targets}


def test_a_stop_on_one_rank_stops_all_at_one_step_and_the_resume_is_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("SSDD_TEST_CKPT", str(tmp_path))
    whole = in_processes("krr_st_uninterrupted")
    resumed = in_processes("krr_st_stop_then_resume")
    assert [int(r["stopped_at"]) for r in resumed] == [3, 3]  # rank 0 stopped too, at the same step
    assert len(list(tmp_path.glob("krr.ckpt-*.pt"))) == 1  # one writer
    for a, b in zip(resumed, whole):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["targets"], b["targets"])
