"""The CUDA fixes that a CPU can check: generators and the devices they draw for, per-device RNG
state in checkpoints, device checks, losses read in batches, the compile fallback and the
deterministic pooling. The GPU side of each is in test_cuda.py (marked `cuda`)."""

import contextlib
import functools
import math

import pytest
import torch
from torch import nn

from ssdd import artifacts, distributed
from ssdd import run as pipeline
from ssdd.data import ImageSet, Normalizer
from ssdd.data.augment import check_generator, crop_flip
from ssdd.distill.engines.krr_engine import KrrStConfig
from ssdd.errors import UserError
from ssdd.loss_log import StepLog
from ssdd.models.inference import CompiledCall
from ssdd.models.pooling import GlobalAvgPool
from ssdd.settings import DistillConfig

DRAWS = ("randint", "rand", "randn", "randperm", "normal", "multinomial", "bernoulli")


@contextlib.contextmanager
def strict_generator_devices():
    """Every torch draw that passes a generator must draw on that generator's device: torch checks this
    only on CUDA, so on a CPU machine the `meta` device stands in for the GPU here."""
    originals = {name: getattr(torch, name) for name in DRAWS}

    def guarded(fn):
        @functools.wraps(fn)
        def draw(*args, generator=None, device=None, **kwargs):
            if generator is not None and device is not None and torch.device(device).type != generator.device.type:
                raise AssertionError(f"torch.{fn.__name__} on {device} with a generator on {generator.device}")
            return fn(*args, generator=generator, **({"device": device} if device is not None else {}), **kwargs)
        return draw

    for name, fn in originals.items():
        setattr(torch, name, guarded(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


def test_the_guard_catches_a_draw_on_another_device():
    with strict_generator_devices(), pytest.raises(AssertionError, match="generator on cpu"):
        torch.randint(0, 5, (3,), device="meta", generator=torch.Generator())


def test_crop_flip_draws_on_its_generators_device_and_moves_the_result():
    """C1: the held-out check hands a CPU generator to crop_flip of GPU images (meta stands in here)."""
    images = torch.zeros(4, 3, 8, 8, device="meta")
    with strict_generator_devices():
        out = crop_flip(images, 2, True, torch.Generator().manual_seed(0))
    assert out.device.type == "meta" and out.shape == images.shape


def test_heldout_batches_take_a_cpu_generator(monkeypatch):
    from ssdd.distill.methods.krr_st import heldout_batches

    data = ImageSet(torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8))
    cfg = DistillConfig(batch=4, krr_st=KrrStConfig(check_batches=2))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(192, 5))
    with strict_generator_devices():
        batches = heldout_batches(data, teacher, Normalizer(*data.mean_std()), cfg, 7, "cpu")
    assert len(batches) == 2 and batches[0][1].shape == (4, 5)


def test_check_generator_names_both_devices():
    check_generator(torch.Generator(), "cpu")
    check_generator(None, "meta")
    with pytest.raises(ValueError, match="on meta from a generator on cpu"):
        check_generator(torch.Generator(), "meta")


def test_rng_state_holds_one_device_and_restores_old_lists(monkeypatch):
    """C2/W3: only the current device's CUDA state is saved; a checkpoint holding every device's state
    (before the fix) restores the current device's entry, and never indexes a missing GPU."""
    state = artifacts.rng_state()
    assert set(state) == {"torch_rng", "cuda_rng"} and not isinstance(state["cuda_rng"], list)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append(s))
    artifacts.restore_rng({"torch_rng": torch.get_rng_state(), "cuda_rng": [torch.tensor([0]), torch.tensor([1])]})
    artifacts.restore_rng({"torch_rng": torch.get_rng_state(), "cuda_rng": [torch.tensor([5])]})  # fewer GPUs now
    artifacts.restore_rng({"torch_rng": torch.get_rng_state(), "cuda_rng": torch.tensor([9])})
    assert [int(s) for s in restored] == [1, 5, 9]


def test_a_checkpoint_resumes_only_on_the_device_kind_that_wrote_it(tmp_path):
    """C3: CPU generators (mt19937) and CUDA ones (Philox) keep different states."""
    artifacts.save_checkpoint(tmp_path, "distill", {"step": 3}, "fp", device="cuda")
    assert artifacts.load_checkpoint(tmp_path, "distill", "fp", "cuda")["step"] == 3
    assert artifacts.load_checkpoint(tmp_path, "distill", "fp")["step"] == 3  # library callers: no check
    with pytest.raises(UserError, match="written on cuda and cannot resume on cpu.*--device cuda") as err:
        artifacts.load_checkpoint(tmp_path, "distill", "fp", "cpu")
    assert "\n" not in str(err.value)


def test_device_indices_are_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pipeline.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(UserError, match="--device cuda:2: this machine has 2 GPU"):
        pipeline.resolve_device("cuda:2")
    with pytest.raises(UserError, match="not supported"):
        pipeline.resolve_device("meta")


def test_torchrun_gives_each_rank_its_own_gpu_or_refuses(monkeypatch):
    """C5: cuda:N on every rank would put all ranks on one GPU; more ranks than GPUs cannot work."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # no group is joined here
    monkeypatch.setattr(distributed, "is_main", lambda: True)
    with pytest.raises(UserError, match="LOCAL_RANK 1 has no GPU of its own"):
        distributed.setup("cuda:0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.setup("cuda:0") == "cuda:1"
    assert distributed.setup("auto") == "cuda:1"
    assert distributed.setup("cpu") == "cpu"


def test_standalone_commands_refuse_torchrun(monkeypatch, tmp_path):
    """W5: every rank would write the same files."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="ssdd pretrain --distilled runs in one process"):
        pipeline.pretrain_file(None, tmp_path / "x.safetensors", tmp_path)


def test_step_log_reads_the_same_floats_in_batches():
    values = [torch.tensor(v, dtype=torch.float32) for v in (0.3, 0.1, 1 / 3, 2.5)]
    seen = []

    def finish(step, floats, info):
        seen.append(step)
        if not math.isfinite(floats[0]):
            raise UserError(f"non-finite at {step}")
        return floats[0]

    log = StepLog([], finish, "cuda", every=3)  # the GPU's batching, on CPU tensors
    assert [log.add(i + 1, [v]) for i, v in enumerate(values)] == [False, False, True, False]
    assert len(log) == 4 and len(log.values) == 3
    assert log.read() == [v.item() for v in values] and seen == [1, 2, 3, 4]
    assert StepLog([], finish, "cpu").every == 1  # a CPU read costs nothing: every step
    log = StepLog([1.0], finish, "cpu")
    with pytest.raises(UserError, match="non-finite at 2"):
        log.add(2, [torch.tensor(float("nan"))])


def test_compiled_call_falls_back_when_the_backward_fails_to_compile():
    """C6: inductor compiles a backward at the first backward(); the warm-up meets that failure inside
    the fallback, and leaves the model's BatchNorm statistics as they were."""
    class BrokenBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("backward lowering failed")

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    call = CompiledCall(lambda m, x: m(x))
    call.compiled = lambda m, x: BrokenBackward.apply(m(x))
    x = torch.randn(2, 3, 6, 6)
    out = call(model, x)
    assert call.failed
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    fresh.load_state_dict(before)
    assert torch.equal(out, fresh(x))  # one forward's statistics update, as eager makes
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_global_avg_pool_is_adaptive_avg_pool_on_cpu():
    x = torch.randn(3, 5, 7, 7, requires_grad=True)
    pool = GlobalAvgPool()
    assert isinstance(pool, nn.AdaptiveAvgPool2d)
    assert torch.equal(pool(x), nn.AdaptiveAvgPool2d(1)(x))
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert torch.equal(pool(x), nn.AdaptiveAvgPool2d(1)(x))  # the mean only replaces it on CUDA
    finally:
        torch.use_deterministic_algorithms(False)
