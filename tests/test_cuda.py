"""GPU checks (marker `cuda`, skipped without a GPU; benchmarks/cuda_check.sh runs them on one).

The CPU halves of these fixes are in test_device_paths.py; here they run where the bugs lived:
generators and devices, every method through the pipeline, exact fp32 (no TF32), resume equality
with deterministic kernels, per-device RNG state, host syncs per KRR-ST step, compiled graphs
reused across pool models, and the precision choice."""

import io
import json
import warnings

import pytest
import torch

from ssdd import artifacts, precision
from ssdd.models import auto_precision
from ssdd.checkpoint import Hooks
from ssdd.cli import main
from ssdd.data import ImageSet, Normalizer
from ssdd.data.augment import crop_flip
from ssdd.determinism import configure
from ssdd.distill import DistillContext, distill_krr_st, random_index, registry
from ssdd.distill.engines.krr import outer_grads
from ssdd.distill.engines.krr_engine import KrrStConfig
from ssdd.distill.methods.krr_st import heldout_batches
from ssdd.errors import Stopped
from ssdd.models import build
from ssdd.settings import DistillConfig
from ssdd.teacher import FeatureExtractor

from test_methods import tiny_args, tiny_npz

pytestmark = pytest.mark.cuda
DEV = torch.device("cuda")
SPEC = {"arch": "convnet", "in_channels": 3, "image_size": 32, "widths": [32, 64], "pool": "flatten", "out_dim": 0}


@pytest.fixture(scope="module")
def source():
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8, generator=g))


@pytest.fixture(scope="module")
def teacher(source):
    torch.manual_seed(0)
    return FeatureExtractor(build({**SPEC, "pool": "gap"})).to(DEV).eval()


def context(source, teacher, steps: int = 8, hooks: Hooks | None = None, m: int = 64) -> DistillContext:
    cfg = DistillConfig(m=m, batch=128, krr_st=KrrStConfig(steps=steps, pool_size=3, pool_max_age=4, compile="off",
                                                           check_batches=1, check_models=1))
    return DistillContext(source, None, teacher, Normalizer(*source.mean_std(), device=DEV), {**SPEC, "out_dim": 64},
                          cfg, 0, random_index(len(source), m, 0), DEV, False, hooks or Hooks())


def test_cpu_generators_draw_for_gpu_images(source, teacher):
    """C1: the held-out check's fixed batches use a CPU generator on GPU images."""
    out = crop_flip(source.images[:8].to(DEV), 4, True, torch.Generator().manual_seed(0))
    assert out.device.type == DEV.type
    cfg = DistillConfig(batch=64, krr_st=KrrStConfig(check_batches=2))
    batches = heldout_batches(ImageSet(source.images[:100]), teacher, Normalizer(*source.mean_std(), device=DEV),
                              cfg, 7, DEV)
    assert len(batches) == 2 and batches[0][0].device.type == DEV.type


@pytest.mark.slow
def test_every_method_runs_through_the_pipeline_on_cuda(tmp_path):
    src = tiny_npz(tmp_path / "src.npz")
    methods = registry.names()
    assert main(["compare", "--out", str(tmp_path / "run"), "--device", "cuda",
                 *tiny_args(src, [src], methods, seeds=1)]) == 0
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {r["method"] for r in rows} >= set(methods) - {"full_ssl"}


def test_fp32_is_ieee_fp32_on_cuda(source, teacher):
    """W1: under precision fp32 no TF32 (a 10-bit mantissa) reaches the outer gradient."""
    torch.manual_seed(3)
    model = build({**SPEC, "out_dim": 64}).eval()
    norm = Normalizer(*source.mean_std())
    xs, xr = norm(source.images[:64]), norm(source.images[64:320])
    with torch.no_grad():
        t_cpu = teacher.cpu()
        ys, tr = t_cpu(xs), t_cpu(xr)
        teacher.to(DEV)

    def grads(device, dtype, prec):
        m = build({**SPEC, "out_dim": 64}).eval()
        m.load_state_dict(model.state_dict())
        m = m.to(device=device, dtype=dtype)
        a, b, c, d = (t.to(device=device, dtype=dtype) for t in (xs, ys, xr, tr))
        with precision.use(prec), precision.autocast(device):
            with torch.no_grad():
                g_r = m.features(c).to(dtype)
            loss, d_x, _ = outer_grads(m, a, b, g_r, d, 1e-3)
        return loss.double().cpu(), d_x.double().cpu().flatten()

    ref_loss, ref_grad = grads("cpu", torch.float64, "fp32")
    loss, grad = grads(DEV, torch.float32, "fp32")
    assert abs(loss - ref_loss) / abs(ref_loss) < 1e-5
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) > 0.9999
    _, grad = grads(DEV, torch.float32, "bf16")
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) > 0.99


def _run(source, teacher, stop_after=None, resume=None):
    box, calls = {}, [0]

    def should_stop():
        calls[0] += 1
        return stop_after is not None and calls[0] >= stop_after

    hooks = Hooks(resume=resume, checkpoint=lambda s: box.update(s=s), should_stop=should_stop)
    try:
        return distill_krr_st(context(source, teacher, hooks=hooks)).images, None
    except Stopped:
        buf = io.BytesIO()
        torch.save(box["s"], buf)
        return None, torch.load(io.BytesIO(buf.getvalue()), map_location="cpu", weights_only=True)


def test_resume_is_bit_identical_with_deterministic_kernels(source, teacher):
    """W2: with --deterministic a rerun and a stopped-and-resumed run equal an uninterrupted one."""
    configure(True, DEV)
    try:
        a, _ = _run(source, teacher)
        b, _ = _run(source, teacher)
        _, state = _run(source, teacher, stop_after=3)
        c, _ = _run(source, teacher, resume=state)
    finally:
        configure(False, DEV)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_rng_state_is_the_current_devices_only():
    """C2/W3: one device's state, restored into the current device, whatever the GPU count."""
    torch.cuda.manual_seed(5)
    torch.rand(3, device=DEV)
    state = artifacts.rng_state()
    assert isinstance(state["cuda_rng"], torch.Tensor)
    a = torch.rand(4, device=DEV)
    artifacts.restore_rng(state)
    assert torch.equal(torch.rand(4, device=DEV), a)
    artifacts.restore_rng({**state, "cuda_rng": [state["cuda_rng"]] * (torch.cuda.device_count() + 2)})
    assert torch.equal(torch.rand(4, device=DEV), a)


def test_a_krr_st_step_waits_for_the_gpu_at_most_twice(source, teacher):
    """S1/S2: no per-step .item(), isfinite branch, index copy or Cholesky info read."""
    def syncs(steps: int) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with precision.use("bf16"):
                    distill_krr_st(context(source, teacher, steps=steps))
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("ynchroniz" in str(w.message) for w in caught)

    assert (syncs(24) - syncs(4)) / 20 <= 2


def test_compiled_pool_reuses_its_graph_across_models_and_seeds(source):
    """S12: re-initialised pool models and a second seed hit the compiled graph (no recompiles)."""
    from ssdd.distill.engines.krr_engine import _forward
    from ssdd.distill.engines.pool import ModelPool
    from ssdd.models.inference import CompiledCall

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    xs = torch.randn(64, 3, 32, 32, device=DEV).contiguous(memory_format=torch.channels_last)
    ys = torch.randn(64, 64, device=DEV)
    forward = CompiledCall(_forward)
    for seed in range(2):
        pool = ModelPool({**SPEC, "out_dim": 64}, 2, 3, device=DEV, seed=seed, forward=forward)
        pool.populate(xs, ys)
        for _ in range(6):
            pool.train_step(pool.pick(), xs, ys)
        assert pool.reinits > 0
    assert not forward.failed
    assert sum(torch._dynamo.utils.counters["recompiles"].values()) == 0


def test_auto_precision_follows_the_gpus_compute_capability():
    """S17: bf16 only where the GPU computes it natively (compute capability 8.0 and up)."""
    native = torch.cuda.get_device_capability(DEV) >= (8, 0)
    assert precision.native_bf16(DEV) == native
    if not native:
        assert auto_precision.resolve("auto", DEV) == "fp32"
