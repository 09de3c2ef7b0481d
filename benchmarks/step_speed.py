"""Time the KRR-ST outer step: ssdd's, and the reference code's side by side in the same process.

    python benchmarks/step_speed.py --config paper --steps 3
    KRRST_OFFICIAL_DIR=/path/to/selfsup_dd python benchmarks/step_speed.py --config paper --steps 3 --check
    python benchmarks/step_speed.py --config paper --m-sweep 1000 2000 5000 10000 --steps 1

The paper config is the CIFAR-100 setting: m = 1000 synthetic 32 px images, a real batch of 1024,
ConvNet-3 (128-256-512, BatchNorm, flatten) in a pool of 10, a ResNet-18 teacher with the padding-2
stem (512-d). Both implementations get the same teacher weights, the same images, the same m,
batch and widths. ``KRRST_OFFICIAL_DIR`` points at a checkout of db-Lee/selfsup_dd (kept outside
this project, never copied); its ``algorithms/distill.py:run`` and ``model_pool.py:ModelPool`` are
imported unchanged. Their teacher is torchvision's ResNet-18 with the padding-2 stem, which needs
torchvision; here it is ssdd's ResNet-18 in the same NCHW layout and op sequence (the same network),
without ssdd's BatchNorm folding or channels-last. Their data loader is replaced by an iterator over
the same in-memory images (faster than theirs), their augmentation is theirs (kornia).

Like every ssdd command, the benchmark keeps freed blocks up to 32 MiB in the process
(``ssdd.allocator``), so the reference code timed in the same process gets that too: equal terms.
``--official-malloc system`` also times it in a child process with glibc's defaults, as the
published code runs. Neither keeps the reference's ~250 MB activations, which the kernel faults in
afresh every step: with a setting that kept them too, its fp32 step took 19.5 s instead of 30.7 s
on a 2-core EPYC (``benchmarks/results/README.md``).

Prints one JSON line per implementation (``impl``, ``config``, ``m``, ``batch``, ``precision``,
``device``, ``median_step_s``, ``min_step_s``, ``peak_mem_mb``, per-phase seconds, the CPU model)
and the speed ratio. ``--check`` compares the loss and the image gradient on identical inputs and
weights (fp32: loss to 1e-5 relative, gradient cosine >= 0.9999; bf16: 1e-2 and 0.99), with the
random-weight teacher and, in fp32, once more with that teacher's features standardised
(:class:`StandardisedTeacher`), and reports both against the reference code run in float64.
Never an asserting test: it reports.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import torch

from ssdd import precision
from ssdd.models import auto_precision
from ssdd.allocator import keep_freed_memory
from ssdd.data import BatchSampler, ImageSet, Normalizer
from ssdd.data.augment import crop_flip
from ssdd.distill.engines.krr import outer_grads
from ssdd.distill.engines.krr_engine import (CachedTeacher, FoldedFeatures, KrrStConfig, OuterStep, _forward,
                                             make_teacher, use_compile)
from ssdd.models.inference import CompiledCall
from ssdd.distill.engines.pool import ModelPool
from ssdd.distill.registry import DistillContext
from ssdd.distill.methods.teacher_views import teacher_views
from ssdd.models import build
from ssdd.phases import PhaseTimer
from ssdd.settings import DistillConfig
from ssdd.teacher.load import FeatureExtractor

CONFIGS = {
    "paper": dict(m=1000, batch=1024, widths=[128, 256, 512], size=32, pool_size=10),
    "small": dict(m=200, batch=256, widths=[64, 128, 256], size=32, pool_size=10),
}
SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data"


class PeakMemory:
    """Peak resident memory (CPU: polled /proc/self/status; CUDA: the allocator's peak) over a block."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb, self._stop = device, 0.0, threading.Event()

    @staticmethod
    def rss_mb() -> float:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.rss_mb())
            time.sleep(0.005)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()


def source_images(n: int, size: int) -> tuple[torch.Tensor, str]:
    """Real CIFAR images from ../shared/data when present (uint8 N x 3 x size x size), else random pixels."""
    for path in sorted(SHARED_CIFAR.glob("**/*.npz")) if SHARED_CIFAR.is_dir() else []:
        with np.load(path) as data:
            for key in data.files:
                arr = data[key]
                if arr.dtype == np.uint8 and arr.ndim == 4 and len(arr) >= 64:
                    x = torch.from_numpy(arr[:n].copy())
                    x = x.permute(0, 3, 1, 2) if x.shape[-1] == 3 else x
                    if x.shape[1:] == (3, size, size):
                        return x.contiguous(), f"{path.name}:{key}"
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)), "random"


def make_teacher_weights(images: torch.Tensor, norm: Normalizer, device: torch.device) -> FeatureExtractor:
    """A ResNet-18 (padding-2 stem) with BatchNorm statistics calibrated on real images (so that folding
    them is not trivial). The weights are random: speed and agreement do not depend on training."""
    torch.manual_seed(0)
    teacher = FeatureExtractor(build({"arch": "resnet18", "in_channels": 3, "image_size": images.shape[-1],
                                      "out_dim": 0, "stem_padding": 2})).to(device)
    teacher.train()
    with torch.no_grad():
        for i in range(0, min(len(images), 2048), 512):
            teacher(norm(images[i:i + 512].to(device)))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


class StandardisedTeacher(torch.nn.Module):
    """The teacher with each feature centred on its mean over calibration images, and all features
    divided by one scale, their overall spread there. The random-weight teacher maps all images to
    nearly the same features, so the KRR-ST loss is tiny (~2e-5) and fp32 rounding is amplified in
    its relative error; these targets vary across images with unit spread, as a trained teacher's do.
    (One scale, not one per feature: some features of the random network barely vary at all.)
    Used by ``--check`` only."""

    def __init__(self, teacher: torch.nn.Module, images: torch.Tensor):
        super().__init__()
        self.teacher = teacher
        with torch.no_grad():
            f = teacher(images).double()
        self.register_buffer("mean", f.mean(0).float())
        self.register_buffer("scale", (f - f.mean(0)).pow(2).mean().sqrt().reciprocal().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.teacher(x) - self.mean) * self.scale


def ssdd_stepper(images: torch.Tensor, norm: Normalizer, teacher, conf: dict, device: torch.device,
                 k: KrrStConfig, cache_views: int = 0) -> OuterStep:
    cfg = DistillConfig(m=conf["m"], batch=conf["batch"], krr_st=k)
    spec = {"arch": "convnet", "in_channels": 3, "image_size": conf["size"], "out_dim": 512,
            "widths": conf["widths"], "pool": "flatten"}
    x_s = norm(images[:conf["m"]].to(device)).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with torch.no_grad():
        y_s = teacher(x_s).clone().requires_grad_(True)
    opt = torch.optim.AdamW([x_s, y_s], lr=k.lr_images, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    torch.manual_seed(1)
    pool = ModelPool(spec, conf["pool_size"], k.pool_max_age, device=device, seed=0, chunk=k.chunk,
                     forward=CompiledCall(_forward) if use_compile(k) else None)
    for _ in range(conf["pool_size"]):
        pool.add(build(spec))
    data = ImageSet(images)
    sampler = BatchSampler(data, conf["batch"], device, 1)
    aug_gen = torch.Generator(device=device).manual_seed(2)
    cache = None
    if cache_views:
        cache = CachedTeacher(build_cache(images, norm, teacher, cache_views, device), cfg.crop_pad, device)
    return OuterStep(x_s, y_s, opt, sched, pool, sampler, aug_gen, make_teacher(teacher, k), norm, cfg, cache)


def build_cache(images: torch.Tensor, norm: Normalizer, teacher, views: int, device: torch.device) -> dict:
    """Cached teacher views of every image, made by the ``teacher_views`` prep stage itself."""
    cfg = DistillConfig(batch=1024, krr_st=KrrStConfig(teacher_cache_views=views))
    ctx = DistillContext(ImageSet(images), None, teacher, norm, {}, cfg, 0, torch.arange(1), device, progress=False)
    return teacher_views(ctx)


def time_steps(step_fn, steps: int, warmup: int, device: torch.device) -> tuple[list[float], float]:
    for _ in range(warmup):
        step_fn()
    times = []
    with PeakMemory(device) as mem:
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step_fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return times, mem.peak_mb


def load_official(path: str):
    """Import the reference code's outer step and model pool, unchanged. Its ``models/wrapper.py`` imports
    torchvision's ResNets at module level (unused on the ConvNet path); without torchvision a stand-in
    module whose ResNets refuse to be built satisfies that import."""
    sys.path.insert(0, path)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        def refuse(*a, **kw):
            raise RuntimeError("torchvision is not installed; the benchmark only builds ConvNets from the reference code")
        tv = types.ModuleType("torchvision")
        tv.models = types.ModuleType("torchvision.models")
        tv.models.resnet18 = tv.models.resnet34 = tv.models.resnet50 = refuse
        sys.modules["torchvision"], sys.modules["torchvision.models"] = tv, tv.models
    from algorithms import distill as official_distill  # type: ignore
    from data.augmentation import get_aug  # type: ignore
    from model_pool import ModelPool as OfficialPool  # type: ignore
    return official_distill, OfficialPool, get_aug


def official_args(conf: dict, num_models: int) -> argparse.Namespace:
    widths = "_".join(map(str, conf["widths"]))
    return argparse.Namespace(num_models=num_models, online_iteration=1000, online_opt="sgd", online_lr=0.1,
                              online_wd=1e-3, train_model=f"convnet_{widths}_bn", img_shape=(3, conf["size"], conf["size"]),
                              num_pretrain_classes=512, outer_grad_norm=0.0)


def official_stepper(official, images: torch.Tensor, norm: Normalizer, teacher, conf: dict, device: torch.device):
    distill_mod, OfficialPool, get_aug = official
    args = official_args(conf, conf["pool_size"])
    torch.manual_seed(1)
    pool = OfficialPool(args, device)  # fresh models (their init() would train each up to 1000 steps)
    x_syn = norm(images[:conf["m"]].to(device)).contiguous()
    teacher_nchw = copy.deepcopy(teacher).to(memory_format=torch.contiguous_format).eval()
    with torch.no_grad():
        y_syn = teacher_nchw(x_syn)
    x_syn.requires_grad_(True)
    y_syn.requires_grad_(True)
    opt = torch.optim.AdamW([x_syn, y_syn], lr=1e-4, weight_decay=0.0)
    aug = get_aug("cifar100", conf["size"], True)[0].to(device)
    aug[-1] = _Normalize(norm)  # their Normalize with our dataset's statistics (same op)
    gen = torch.Generator().manual_seed(1)

    def batches():
        while True:
            idx = torch.randperm(len(images), generator=gen)[:conf["batch"]]
            yield images[idx].float() / 255, None

    it = batches()
    return lambda: distill_mod.run(args, device, teacher_nchw, pool, opt, it, aug, x_syn, y_syn)


class _Normalize(torch.nn.Module):
    def __init__(self, norm: Normalizer):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm.normalize_unit(x)


def check_maths(official, images: torch.Tensor, norm: Normalizer, teacher, conf: dict, device: torch.device,
                k: KrrStConfig, prec: str, targets: str = "random teacher") -> dict:
    """Loss and image gradient of both implementations on identical weights and inputs."""
    distill_mod, OfficialPool, _ = official
    args = official_args(conf, 1)
    torch.manual_seed(5)
    pool = OfficialPool(args, device)
    ref_model = pool.models[0]
    ours = build({"arch": "convnet", "in_channels": 3, "image_size": conf["size"], "out_dim": 512,
                  "widths": conf["widths"], "pool": "flatten"}).to(device)
    ref_model.train()  # non-trivial BatchNorm running statistics, then the same weights in both
    with torch.no_grad():
        ref_model(norm(images[:512].to(device)))
    mapped = {}
    for key, value in ref_model.state_dict().items():  # layers.i.block.j.* -> backbone.(4i + j).*
        if key.startswith("fc."):
            mapped["head." + key[3:]] = value
        else:
            _, i, _, j, rest = key.split(".", 4)
            mapped[f"backbone.{4 * int(i) + int(j)}.{rest}"] = value
    ours.load_state_dict(mapped)
    gen = torch.Generator(device=device).manual_seed(9)
    x_real = norm(crop_flip(images[-conf["batch"]:].to(device), 4, True, gen))
    x_s = norm(images[:conf["m"]].to(device))
    teacher_nchw = copy.deepcopy(teacher).to(memory_format=torch.contiguous_format).eval()
    with torch.no_grad():
        y_s = teacher_nchw(x_s)
    def official_run(dtype: torch.dtype) -> tuple[float, torch.Tensor]:
        """One call of their step with a zero learning rate (nothing moves before the gradient is read)."""
        pool.models[0] = ref_model.to(dtype)
        x_syn, y_syn = x_s.to(dtype).clone().requires_grad_(True), y_s.to(dtype).clone().requires_grad_(True)
        opt = torch.optim.SGD([x_syn, y_syn], lr=0.0)
        loss = distill_mod.run(args, device, teacher_nchw.to(dtype), pool, opt, iter([(x_real.to(dtype), None)]),
                               torch.nn.Identity(), x_syn, y_syn).item()
        return loss, x_syn.grad.detach().clone()

    state = copy.deepcopy(ref_model.state_dict())
    ref_loss, ref_grad = official_run(torch.float32)
    ref_model.load_state_dict(state)  # their step trained the model after reading the gradient
    exact_loss, exact_grad = official_run(torch.float64)
    ref_model.to(torch.float32).load_state_dict(state)
    teacher_nchw.to(torch.float32)
    # ssdd: its teacher (folded, compiled as configured) and its step's gradient function, at the precision
    fast_teacher = make_teacher(teacher, k)
    ours.eval()  # as OuterStep passes the picked model
    model = FoldedFeatures(ours) if k.fold_bn else ours
    x_cl = x_real.contiguous(memory_format=torch.channels_last)
    x_s_cl = x_s.contiguous(memory_format=torch.channels_last)
    with precision.use(prec):
        with torch.inference_mode(), precision.autocast(device):
            t_real = fast_teacher(x_cl).float()
            g_r = model.features(x_cl).float()
        with precision.autocast(device):
            loss, d_x, _ = outer_grads(model, x_s_cl, y_s, g_r.clone(), t_real.clone(), k.ridge, k.chunk)
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()  # noqa: E731
    rel = abs(loss.item() - ref_loss) / abs(ref_loss)
    bound = (1e-5, 0.9999) if prec == "fp32" else (1e-2, 0.99)
    return {"check": prec, "targets": targets, "official_loss": ref_loss, "ssdd_loss": loss.item(), "loss_rel_diff": rel,
            "grad_cosine": cos(d_x, ref_grad), "bounds": {"loss_rel": bound[0], "grad_cosine": bound[1]},
            "within_bounds": rel <= bound[0] and cos(d_x, ref_grad) >= bound[1],
            "float64_truth": {"note": "the reference code run in float64 on the same inputs and weights",
                              "loss": exact_loss,
                              "official_fp32_loss_rel_err": abs(ref_loss - exact_loss) / abs(exact_loss),
                              "ssdd_loss_rel_err": abs(loss.item() - exact_loss) / abs(exact_loss),
                              "official_fp32_grad_cosine": cos(ref_grad, exact_grad),
                              "ssdd_grad_cosine": cos(d_x, exact_grad)}}


def official_in_child(args: argparse.Namespace) -> dict:
    """The reference code's timing line from a child process run with glibc's malloc defaults."""
    child = ["--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
             "--chunk", str(args.chunk), "--impl", "official", "--official-malloc", "same"]
    child += ["--m", str(args.m)] if args.m else []
    out = subprocess.run([sys.executable, __file__, *child], env={**os.environ, "SSDD_MALLOC": "system"},
                         capture_output=True, text=True, check=True)
    return next(json.loads(line) for line in out.stdout.splitlines() if '"impl": "official"' in line)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="paper")
    p.add_argument("--steps", type=int, default=3, help="timed steps per implementation (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", choices=precision.CHOICES, default="auto", help="ssdd's precision (default auto)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--impl", choices=("both", "ssdd", "official"), default="both")
    p.add_argument("--variants", nargs="*", default=[],
                   choices=("fp32", "cache", "fp32-cache", "nofold", "nocompile", "fp32-nocompile"),
                   help="also time ssdd with: exact fp32, the teacher-feature cache (--cache-views), no BN folding, "
                        "an eager teacher (the default compiles it, as a paper-length run does)")
    p.add_argument("--cache-views", type=int, default=8)
    p.add_argument("--check", action="store_true", help="compare loss and gradient with the reference code")
    p.add_argument("--m", type=int, help="override the config's m")
    p.add_argument("--m-sweep", type=int, nargs="+", help="time ssdd only, at each of these m (memory scaling)")
    p.add_argument("--chunk", type=int, default=KrrStConfig.chunk, help="distill.krr_st.chunk")
    p.add_argument("--official-malloc", nargs="+", choices=("same", "system"), default=["same"],
                   help="time the reference code with this process's allocator setting (same: ssdd's kept freed "
                        "memory, equal terms) and/or with glibc's defaults in a child process (system: as the "
                        "published code runs)")
    args = p.parse_args(argv)

    kept = keep_freed_memory()  # as every ssdd command does; SSDD_MALLOC=system for glibc's defaults
    device = torch.device(args.device)
    prec = auto_precision.resolve(args.precision, device)
    conf = dict(CONFIGS[args.config])
    if args.m:
        conf["m"] = args.m
    n_images = max(conf["m"] * 2, 4096, max(args.m_sweep or [0]))
    images, origin = source_images(n_images, conf["size"])
    if len(images) < n_images:  # tile a small real set up to the needed count
        images = images.repeat((n_images + len(images) - 1) // len(images), 1, 1, 1)[:n_images]
    norm = Normalizer(*ImageSet(images).mean_std(), device=device)
    teacher = make_teacher_weights(images, norm, device)
    header = {"cpu": precision.cpu_model(), "device_info": precision.describe(device), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "images": origin, "malloc": "kept" if kept else "system"}
    print(json.dumps({"benchmark": "step_speed", **header}), flush=True)

    def run_ssdd(label: str, conf: dict, prec: str, **kw) -> dict:
        k = KrrStConfig(chunk=args.chunk, fold_bn=kw.get("fold", True), compile=kw.get("compile", "auto"))
        with precision.use(prec):
            stepper = ssdd_stepper(images, norm, teacher, conf, device, k, kw.get("cache", 0))
            timer = PhaseTimer(device)
            counter = iter(range(10**9))
            compile_start = time.perf_counter()
            stepper(next(counter))  # the first call compiles when asked to
            first = time.perf_counter() - compile_start
            timer_steps = lambda step=stepper: step(next(counter), timer)  # noqa: E731
            times, peak = time_steps(timer_steps, args.steps, max(0, args.warmup - 1), device)
        line = {"impl": "ssdd", "variant": label, "config": args.config, "m": conf["m"], "batch": conf["batch"],
                "precision": prec, "device": str(device), "median_step_s": statistics.median(times),
                "min_step_s": min(times), "first_step_s": first, "peak_mem_mb": round(peak),
                "phases_s": {name: round(t / args.steps, 3) for name, t in timer.totals.items()},
                "chunk": args.chunk, "cpu": header["cpu"]}
        print(json.dumps(line), flush=True)
        del stepper, timer_steps
        gc.collect()
        return line

    if args.m_sweep:
        for m in args.m_sweep:
            run_ssdd(f"m={m}", {**conf, "m": m}, prec)
        return

    results = {}
    if args.impl in ("both", "ssdd"):
        results["ssdd"] = run_ssdd("default", conf, prec)
        for variant in args.variants:
            kw = {"fp32": dict(), "cache": dict(cache=args.cache_views), "fp32-cache": dict(cache=args.cache_views),
                  "nofold": dict(fold=False), "nocompile": dict(compile="off"),
                  "fp32-nocompile": dict(compile="off")}[variant]
            vprec = "fp32" if variant.startswith("fp32") else prec
            results[variant] = run_ssdd(variant.replace("cache", f"cache{args.cache_views}"), conf, vprec, **kw)
    official_dir = os.environ.get("KRRST_OFFICIAL_DIR")
    if args.impl in ("both", "official"):
        if not official_dir:
            print(json.dumps({"impl": "official", "skipped": "KRRST_OFFICIAL_DIR is not set"}), flush=True)
        else:
            official = load_official(official_dir)
            lines = []
            for setting in args.official_malloc:
                if setting == "system" and kept:  # glibc's defaults, as the published code runs: a fresh process
                    line = official_in_child(args)
                else:
                    step = official_stepper(official, images, norm, teacher, conf, device)
                    times, peak = time_steps(step, args.steps, args.warmup, device)
                    del step
                    gc.collect()
                    line = {"impl": "official", "config": args.config, "m": conf["m"], "batch": conf["batch"],
                            "precision": "fp32", "device": str(device), "median_step_s": statistics.median(times),
                            "min_step_s": min(times), "peak_mem_mb": round(peak), "cpu": header["cpu"],
                            "malloc": "kept" if kept else "system"}
                print(json.dumps(line), flush=True)
                lines.append(line)
            for line in lines:
                for name, res in results.items():
                    print(json.dumps({"ratio": f"official[malloc {line['malloc']}] / ssdd[{res.get('variant', name)}, "
                                               f"{res['precision']}, malloc {header['malloc']}]",
                                      "median": line["median_step_s"] / res["median_step_s"],
                                      "min": line["min_step_s"] / res["min_step_s"]}), flush=True)
            if args.check:
                checks = {"fp32"} | ({prec} if prec != "fp32" else set())
                for c in sorted(checks):
                    print(json.dumps(check_maths(official, images, norm, teacher, conf, device,
                                                 KrrStConfig(chunk=args.chunk), c)), flush=True)
                calibration = norm(images[-2048:].to(device)).contiguous(memory_format=torch.channels_last)
                standardised = StandardisedTeacher(teacher, calibration).eval()
                print(json.dumps(check_maths(official, images, norm, standardised, conf, device,
                                             KrrStConfig(chunk=args.chunk), "fp32", "standardised teacher")),
                      flush=True)


if __name__ == "__main__":
    main()
