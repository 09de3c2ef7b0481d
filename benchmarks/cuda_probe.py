"""Numbers behind the CUDA fixes, one JSON line per probe (ok / error / numbers). Reports, never asserts.

    python benchmarks/cuda_probe.py                # on a GPU (what benchmarks/cuda_check.sh runs)
    python benchmarks/cuda_probe.py --device cpu   # a dry run of the probes that make sense on a CPU

Probes: the precision facts and ``auto``'s measured choice; the outer gradient against float64 with
TF32 on, off (ssdd's fp32) and bf16; host syncs per KRR-ST step, by source line; rerun and resume
differences with default and with deterministic kernels; a compiled pool across re-initialisations
and seeds (recompiles, fallback); one KRR-ST step with and without the per-step BatchNorm fold.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import time
import warnings

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts: deterministic mode needs it

import torch  # noqa: E402

from ssdd import precision  # noqa: E402
from ssdd.models import auto_precision
from ssdd.checkpoint import Hooks  # noqa: E402
from ssdd.data import ImageSet, Normalizer  # noqa: E402
from ssdd.determinism import configure  # noqa: E402
from ssdd.distill import DistillContext, distill_krr_st, random_index  # noqa: E402
from ssdd.distill.engines.krr import outer_grads  # noqa: E402
from ssdd.distill.engines.krr_engine import KrrStConfig, _forward  # noqa: E402
from ssdd.distill.engines.pool import ModelPool  # noqa: E402
from ssdd.errors import Stopped  # noqa: E402
from ssdd.models import build  # noqa: E402
from ssdd.models.inference import CompiledCall  # noqa: E402
from ssdd.settings import DistillConfig  # noqa: E402
from ssdd.teacher import FeatureExtractor  # noqa: E402

SPEC = {"arch": "convnet", "in_channels": 3, "image_size": 32, "widths": [64, 128, 256], "pool": "flatten", "out_dim": 0}


def out(**kw) -> None:
    print(json.dumps(kw, default=str), flush=True)


def attempt(name: str, fn) -> None:
    start = time.perf_counter()
    try:
        result = fn() or {}
        out(probe=name, ok=True, s=round(time.perf_counter() - start, 1), **result)
    except Exception as err:  # a probe reports its failure and the next one runs
        out(probe=name, ok=False, error=f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    g = torch.Generator().manual_seed(0)
    src = ImageSet(torch.randint(0, 256, (2048, 3, 32, 32), dtype=torch.uint8, generator=g))
    norm = Normalizer(*src.mean_std(), device=dev)
    torch.manual_seed(0)
    teacher = FeatureExtractor(build({**SPEC, "pool": "gap"})).to(dev).eval()

    def ctx_for(steps: int, hooks: Hooks | None = None, fold: bool = True) -> DistillContext:
        cfg = DistillConfig(m=200, batch=256, krr_st=KrrStConfig(steps=steps, pool_size=4, pool_max_age=5, compile="off",
                                                                fold_bn=fold, check_batches=1, check_models=1))
        return DistillContext(src, None, teacher, norm, {**SPEC, "out_dim": 256}, cfg, 0,
                              random_index(len(src), cfg.m, 0), dev, False, hooks or Hooks())

    out(probe="environment", device=precision.describe(dev), torch=torch.__version__, cpu=precision.cpu_model(),
        cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if cuda else None,
        capability=torch.cuda.get_device_capability(dev) if cuda else None,
        gpu_gib=round(torch.cuda.get_device_properties(dev).total_memory / 2**30) if cuda else None)

    def precision_facts() -> dict:
        inside = {}
        with precision.use("fp32"):
            inside = {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                      "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
        return {"native_bf16": precision.native_bf16(dev), "auto": auto_precision.resolve("auto", dev),
                "inside_fp32": inside, "outside_cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}
    attempt("precision", precision_facts)

    def outer_grad_error() -> dict:
        torch.manual_seed(3)
        model = build({**SPEC, "out_dim": 256}).eval()
        xs, xr = norm(src.images[:200].to(dev)).cpu(), norm(src.images[200:712].to(dev)).cpu()
        with torch.no_grad():
            ys, tr = teacher(xs.to(dev)).float().cpu(), teacher(xr.to(dev)).float().cpu()

        def run(device, dtype, prec, tf32):
            m = build({**SPEC, "out_dim": 256}).eval()
            m.load_state_dict(model.state_dict())
            m = m.to(device=device, dtype=dtype)
            a, b, c, d = (t.to(device=device, dtype=dtype) for t in (xs, ys, xr, tr))
            with precision.use(prec):
                torch.backends.cudnn.allow_tf32 = tf32 or torch.backends.cudnn.allow_tf32
                with precision.autocast(device):
                    with torch.no_grad():
                        g_r = m.features(c).to(dtype)
                    loss, d_x, _ = outer_grads(m, a, b, g_r, d, 1e-3)
            return loss.double().cpu(), d_x.double().cpu().flatten()

        ref_loss, ref_grad = run("cpu", torch.float64, "fp32", False)
        res = {}
        for name, setting in {"fp32": ("fp32", False), "fp32_with_tf32": ("fp32", True), "bf16": ("bf16", False)}.items():
            loss, grad = run(dev, torch.float32, *setting)
            res[name] = {"loss_rel": ((loss - ref_loss).abs() / ref_loss.abs()).item(),
                         "grad_cos": torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0).item()}
        return res
    attempt("outer_grads_vs_float64", outer_grad_error)

    if cuda:
        def syncs() -> dict:
            def count(steps: int) -> collections.Counter:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        with precision.use(auto_precision.resolve("auto", dev)):
                            distill_krr_st(ctx_for(steps))
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
                return collections.Counter(f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught
                                           if "ynchroniz" in str(w.message))
            short, long = count(5), count(25)
            per_step = {k: (long[k] - short[k]) / 20 for k in long if long[k] != short[k]}
            return {"syncs_per_step": sum(per_step.values()), "by_line_per_step": per_step,
                    "setup_syncs": sum(short.values())}
        attempt("syncs_per_krr_st_step", syncs)

    def krr_run(stop_after=None, resume=None):
        box, calls = {}, [0]

        def should_stop():
            calls[0] += 1
            return stop_after is not None and calls[0] >= stop_after
        try:
            hooks = Hooks(resume=resume, checkpoint=lambda s: box.update(s=s), should_stop=should_stop)
            return distill_krr_st(ctx_for(12, hooks)).images, None
        except Stopped:
            buf = io.BytesIO()
            torch.save(box["s"], buf)
            return None, torch.load(io.BytesIO(buf.getvalue()), map_location="cpu", weights_only=True)

    def determinism(deterministic: bool):
        def probe() -> dict:
            configure(deterministic, dev)
            try:
                a, _ = krr_run()
                b, _ = krr_run()
                _, state = krr_run(stop_after=6)
                c, _ = krr_run(resume=state)
            finally:
                configure(False, dev)
            return {"rerun_max_abs": (a - b).abs().max().item(), "resume_max_abs": (a - c).abs().max().item(),
                    "resume_bit_identical": torch.equal(a, c)}
        return probe
    attempt("determinism_default_kernels", determinism(False))
    attempt("determinism_deterministic_kernels", determinism(True))

    def compiled_pool() -> dict:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        res, start = {}, time.perf_counter()
        xs = torch.randn(200, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
        ys = torch.randn(200, 256, device=dev)
        forward = CompiledCall(_forward)
        for seed in range(3):
            pool = ModelPool({**SPEC, "out_dim": 256}, 3, 4, device=dev, seed=seed, forward=forward)
            with precision.use(auto_precision.resolve("auto", dev)):
                pool.populate(xs, ys)
                for _ in range(8):
                    pool.train_step(pool.pick(), xs, ys)
            if cuda:
                torch.cuda.synchronize(dev)
            res[f"seed{seed}_s"] = round(time.perf_counter() - start, 2)
            start = time.perf_counter()
        res["fell_back_to_eager"] = forward.failed
        res["recompiles"] = sum(torch._dynamo.utils.counters["recompiles"].values())
        return res
    attempt("compiled_pool", compiled_pool)

    def fold_or_not() -> dict:
        res = {}
        for fold in (True, False):
            with precision.use(auto_precision.resolve("auto", dev)):
                distill_krr_st(ctx_for(3, fold=fold))  # warm-up
                if cuda:
                    torch.cuda.synchronize(dev)
                start = time.perf_counter()
                distill_krr_st(ctx_for(23, fold=fold))
                if cuda:
                    torch.cuda.synchronize(dev)
            res["fold" if fold else "nofold"] = round((time.perf_counter() - start) / 23, 4)
        return {"s_per_step": res, "note": "each run includes its pool's initial training"}
    attempt("pool_batchnorm_fold", fold_or_not)


if __name__ == "__main__":
    main()
