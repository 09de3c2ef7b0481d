"""How equal are N torchrun ranks to one process? The demo teacher (Barlow Twins, AdamW) on CPU, fp32.

    python benchmarks/rank_equality.py --jsonl benchmarks/results/DATE/rank_equality.jsonl

Trains the demo preset's teacher (ConvNet 32-64-128, Barlow Twins, AdamW lr 2e-3) for ``--epochs``
epochs (17 steps each) on the bundled mnist5k source, several times, and compares the results:

1. with ssdd's own CLI (``ssdd run --preset demo --until teacher --device cpu --precision fp32``),
   each into its own --out folder: one process with 1 thread, one with 2 threads, and ``--procs``
   gloo ranks of 1 thread each under torchrun;
2. with the library (``ssdd.teacher.train.train_barlow_twins``, data from run 1's folder) in a
   process this script controls: the shipped model once more (a control: it must equal the CLI's
   1-thread run bit for bit; it also records, every step, the gradient of the conv biases that sit
   in front of a BatchNorm and AdamW's update of them), then variants, each with 1 thread,
   2 threads and the torchrun ranks:
   ``nobias``: those biases set to zero and frozen right after the model is built (AdamW skips
   them; the initialisation draws and state-dict keys stay those of the shipped model, and the
   training is the same mathematics, as BatchNorm's mean subtraction cancels such a bias);
   ``nchw``: the encoder in the contiguous (NCHW) memory format instead of ssdd's channels-last;
   ``nchw_nobias``: both.
3. one step's gradient (no update) in each memory format: 1 process (1, 2 threads), the ranks
   (ssdd's global BatchNorm, gathered embeddings, summed gradients), each in fp32 and fp64, against
   1 process in fp64; short trainings of ``--growth-steps`` steps show how the difference grows.

For each pair of teachers it prints the relative L2 difference ||a - b|| / ||b|| of the conv
biases, of the other parameters, of the BatchNorm running statistics, and of the features (eval
mode, as distillation uses the teacher, and train mode) on a fixed batch of 256 held-out images.
On one batch it shows the mechanism: such a bias's gradient is rounding noise (fp64: the exact
value, ~1e-13 of the BatchNorm shift's gradient), yet AdamW's first step on it is of size lr, its
sign set by the thread count; and the chain of the gradient's rounding error from the loss back to
the first conv, per layout. It checks what removing the biases for real (``bias=False``) changes:
initialisation draws and state-dict keys; and, in eval mode, what a bias does once BatchNorm's
running mean no longer matches it.

Every line printed is one JSON object (also appended to ``--jsonl``); timings carry the CPU model;
the last line is a summary. Never an asserting test: it reports. About 8 minutes on 2 busy cores.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
FEATURE_IMAGES = 256


# ---- shared helpers ---------------------------------------------------------------------------

def prenorm_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d, str, nn.Module]]:
    """(name, conv, norm name, norm) for every conv with a bias followed directly by a normalisation
    layer that subtracts a per-channel mean (BatchNorm, GroupNorm with one group per channel)."""
    found = []
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name, conv), (norm_name, norm) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and conv.bias is not None and isinstance(norm, NORMS):
                if isinstance(norm, nn.GroupNorm) and norm.num_groups != norm.num_channels:
                    continue  # a group mean over several channels does not cancel a per-channel bias
                join = (lambda n: f"{prefix}.{n}" if prefix else n)
                found.append((join(name), conv, join(norm_name), norm))
    return found


def rel(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """||a - b|| / ||b|| in fp64; None when b is zero (nothing to compare)."""
    a, b = a.double().flatten(), b.double().flatten()
    denominator = b.norm().item()
    return None if denominator == 0 else (a - b).norm().item() / denominator


def rms(t: torch.Tensor) -> float:
    return t.double().pow(2).mean().sqrt().item()


def sig(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


def groups(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict cut into the groups compared: conv biases in front of a norm, every other
    parameter, BatchNorm running means and variances (each group concatenated)."""
    bias_keys = {f"{name}.bias" for name, *_ in prenorm_convs(model)}
    params = dict(model.named_parameters())
    out: dict[str, list[torch.Tensor]] = {"conv_bias": [], "other_params": [], "running_mean": [], "running_var": []}
    for key, value in model.state_dict().items():
        if key in bias_keys:
            out["conv_bias"].append(value.flatten())
        elif key in params:
            out["other_params"].append(value.flatten())
        elif key.endswith("running_mean"):
            out["running_mean"].append(value.flatten())
        elif key.endswith("running_var"):
            out["running_var"].append(value.flatten())
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in out.items()}


def to_nchw(model: nn.Module) -> nn.Module:
    """The model in the contiguous (NCHW) memory format, its inputs made contiguous too."""
    model.to(memory_format=torch.contiguous_format)
    getattr(model, "backbone", model).register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    return model


def emit(row: dict, sink: list) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    sink.append(line)


def teacher_config(epochs: int):
    from ssdd.settings import load_config
    return load_config("demo", {"teacher.epochs": epochs})


# ---- the worker: one teacher training through the library, in a process we control ---------------

def _install_variant(variant: str, record: bool) -> dict:
    """Wrap ssdd.teacher.train's ``build`` (the encoder is its first call): ``nobias`` zeroes and
    freezes the conv biases in front of a norm; ``nchw`` runs the encoder in the contiguous (NCHW)
    memory format instead of ssdd's channels-last (weights converted, inputs made contiguous);
    ``record`` swaps in an AdamW that logs, every step, those biases' gradients and updates (reads
    only: the numbers stay bit-identical)."""
    import ssdd.teacher.train as train_module

    state: dict = {"model": None, "steps": []}
    original_build = train_module.build

    def build(spec: dict):
        model = original_build(spec)
        if state["model"] is None:
            state["model"] = model
            if variant.startswith("nchw"):
                to_nchw(model)
            if variant.endswith("nobias"):
                for _, conv, _, _ in prenorm_convs(model):
                    with torch.no_grad():
                        conv.bias.zero_()
                    conv.bias.requires_grad_(False)
        return model

    train_module.build = build
    if record:
        class RecordingAdamW(torch.optim.AdamW):
            @torch.no_grad()
            def step(self, closure=None):
                pairs = prenorm_convs(state["model"]) if state["model"] is not None else []
                before = [(conv.bias.clone(), conv.weight.clone()) for _, conv, _, _ in pairs]
                grads = [(conv.bias.grad.clone(), norm.bias.grad.clone(), conv.weight.grad.clone())
                         for _, conv, _, norm in pairs]
                out = super().step(closure)
                lr = self.param_groups[0]["lr"]
                rows = []
                for (_, conv, _, _), (b0, w0), (gb, gbeta, gw) in zip(pairs, before, grads):
                    rows.append({"grad_bias_over_grad_bn_shift": gb.norm().item() / max(gbeta.norm().item(), 1e-300),
                                 "grad_bias_abs_median": gb.abs().median().item(),
                                 "update_bias_rms_over_lr": rms(conv.bias - b0) / lr,
                                 "update_weight_rms_over_lr": rms(conv.weight - w0) / lr})
                state["steps"].append(rows)
                return out

        torch.optim.AdamW = RecordingAdamW
    return state


def worker(args: argparse.Namespace) -> None:
    from ssdd import artifacts, determinism, distributed, precision
    from ssdd.data import ImageSet, Normalizer
    from ssdd.data.dataset import load_dataset
    from ssdd.teacher.train import train_barlow_twins

    torch.set_num_threads(args.threads)
    device = distributed.setup("cpu")
    determinism.configure(False, device)
    state = _install_variant(args.variant, args.record)
    cfg = teacher_config(args.epochs)
    data = load_dataset(Path(args.data) / "source_train.safetensors")
    norm = Normalizer(*data.mean_std(), device=device)
    if args.subset_steps:  # one epoch of this many steps (the normaliser stays the full set's)
        data = ImageSet(data.images[:cfg.teacher.batch * args.subset_steps])
    start = time.perf_counter()
    with precision.use("fp32"):
        result = train_barlow_twins(data, norm, cfg.teacher, cfg.seed, device, progress=False, data_parallel=True)
    seconds = time.perf_counter() - start
    artifacts.save_encoder(args.save, result.encoder, result.spec, {"method": "barlow_twins", "variant": args.variant})
    if distributed.is_main():
        row = {"worker": args.variant, "procs": distributed.world(), "threads_per_proc": torch.get_num_threads(),
               "seconds": round(seconds, 1), "final_loss": result.losses[-1], "steps": len(result.losses)}
        if state["steps"]:
            layers = len(state["steps"][0])
            row["per_layer_median_over_steps"] = [
                {k: sig(sorted(s[i][k] for s in state["steps"])[len(state["steps"]) // 2])
                 for k in state["steps"][0][i]} for i in range(layers)]
        print("WORKER " + json.dumps(row), flush=True)


def grad_worker(args: argparse.Namespace) -> None:
    """One Barlow Twins step's gradient (no update) on the first 256 source images, in one process or
    as one of several torchrun ranks (ssdd's own data-parallel pieces: global BatchNorm, gathered
    embeddings, summed gradients); rank 0 saves it."""
    from ssdd import distributed
    from ssdd.data import Normalizer
    from ssdd.data.augment import ssl_views
    from ssdd.data.dataset import load_dataset
    from ssdd.models import build, model_spec
    from ssdd.models.global_norm import to_global
    from ssdd.models.ssl import barlow_twins_loss, projector

    torch.set_num_threads(args.threads)
    distributed.setup("cpu")
    dtype = torch.float64 if args.dtype == "fp64" else torch.float32
    tcfg = teacher_config(1).teacher
    data = load_dataset(Path(args.data) / "source_train.safetensors")
    norm = Normalizer(*data.mean_std())
    torch.manual_seed(0)
    encoder = build(model_spec(tcfg.model, *data.shape[:2], out_dim=0))
    proj = projector(encoder.feature_dim, tcfg.projector)
    if args.variant == "nchw":
        to_nchw(encoder)
    views = ssl_views(data.images[:1], tcfg.min_crop_scale, tcfg.hue)
    x = data.images[:tcfg.batch].float() / 255
    v1, v2 = norm.normalize_unit(views(x)).to(dtype), norm.normalize_unit(views(x)).to(dtype)
    encoder, proj = encoder.to(dtype), proj.to(dtype)
    parallel = distributed.active()
    if parallel:
        to_global(encoder), to_global(proj)
        mine = distributed.share(len(x))
        v1, v2 = v1[mine], v2[mine]
    z1, z2 = proj(encoder.features(v1)), proj(encoder.features(v2))
    if parallel:
        z1, z2 = distributed.gather_keep_grad(z1, len(x)), distributed.gather_keep_grad(z2, len(x))
    loss = barlow_twins_loss(z1, z2, tcfg.redundancy_weight)
    loss.backward()
    params = list(encoder.parameters()) + list(proj.parameters())
    if parallel:
        distributed.sum_gradients_(params)
    if distributed.is_main():
        bias_keys = {f"{name}.bias" for name, *_ in prenorm_convs(encoder)}
        out = {"loss": loss.detach().reshape(1).double()}
        for name, param in encoder.named_parameters():
            key = "conv_bias" if name in bias_keys else "encoder_other"
            out.setdefault(key, []).append(param.grad.double().flatten())
        out["projector"] = [param.grad.double().flatten() for param in proj.parameters()]
        torch.save({k: torch.cat(v) if isinstance(v, list) else v for k, v in out.items()}, args.save)


def one_step_gradients(args: argparse.Namespace, work: Path, data_dir: Path, sink: list) -> dict:
    """Each layout: the gradient of 1 process (1 and 2 threads) and of ``--procs`` ranks, fp32 and
    fp64, against 1 process in fp64."""
    from ssdd.precision import cpu_model

    me = [os.path.abspath(__file__), "--grad-worker", "--data", str(data_dir)]
    summary = {}
    for layout in ("channels_last", "nchw"):
        grads, start = {}, time.perf_counter()
        plan = [("1p_1t", [sys.executable], 1, "fp32"), ("1p_2t", [sys.executable], 2, "fp32"),
                ("1p_1t_fp64", [sys.executable], 1, "fp64")]
        if args.procs > 1:
            plan += [(f"{args.procs}r", torchrun(args.procs), 1, "fp32"), (f"{args.procs}r_fp64", torchrun(args.procs), 1, "fp64")]
        for name, launcher, threads, dtype in plan:
            save = work / f"grad_{layout}_{name}.pt"
            run_cmd([*launcher, *me, "--threads", str(threads), "--variant", layout, "--dtype", dtype, "--save", str(save)],
                    threads, work / f"grad_{layout}_{name}.log")
            grads[name] = torch.load(save)
        reference = grads["1p_1t_fp64"]
        rows = {name: {k: sig(rel(g[k], reference[k])) for k in reference}
                for name, g in grads.items() if name != "1p_1t_fp64"}
        if args.procs > 1:
            rows[f"{args.procs}r_vs_1p_1t"] = {k: sig(rel(grads[f"{args.procs}r"][k], grads["1p_1t"][k])) for k in reference}
        emit({"part": "one_step_gradient", "layout": layout, "what": "rel difference to 1 process, 1 thread, fp64 "
              "(one Barlow Twins step, first 256 images, before any update)", "rows": rows,
              "seconds_all_launches": round(time.perf_counter() - start, 1), "cpu": cpu_model()}, sink)
        summary[layout] = rows
    return summary


# ---- the measured runs ------------------------------------------------------------------------

def run_cmd(cmd: list[str], threads: int, log_path: Path) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    log_path.write_text(f"$ OMP_NUM_THREADS={threads} {' '.join(cmd)}\n{out.stdout}\n{out.stderr}")
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return seconds, out.stdout


def torchrun(procs: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]


def stored(path: Path, row: dict) -> dict:
    path.write_text(json.dumps(row))
    return row


def reused(args: argparse.Namespace, teacher: Path, row_file: Path, sink: list) -> bool:
    """With --reuse, a teacher already trained (and its printed row) is kept, the row printed again."""
    if not (args.reuse and teacher.is_file() and row_file.is_file()):
        return False
    row = json.loads(row_file.read_text())
    row.pop("record", None)
    emit({**row, "reused": True}, sink)
    return True


def cli_runs(args: argparse.Namespace, work: Path, sink: list) -> dict[str, Path]:
    from ssdd.precision import cpu_model

    cli = ["-m", "ssdd", "run", "--preset", "demo", "--until", "teacher", "--device", "cpu", "--precision", "fp32",
           "--set", f"teacher.epochs={args.epochs}", "--no-progress", "--out"]
    plan = {"cli_1t": ([sys.executable], 1, 1), "cli_2t": ([sys.executable], 2, 1)}
    if args.procs > 1:
        plan[f"cli_{args.procs}r"] = (torchrun(args.procs), 1, args.procs)
    paths = {}
    for name, (launcher, threads, procs) in plan.items():
        out = work / name
        paths[name] = out / "teacher.safetensors"
        if reused(args, paths[name], work / f"{name}.row.json", sink):
            continue
        shutil.rmtree(out, ignore_errors=True)
        load = os.getloadavg()[0]
        seconds, _ = run_cmd([*launcher, *cli, str(out)], threads, work / f"{name}.log")
        emit(stored(work / f"{name}.row.json", {
            "run": name, "route": "ssdd run --until teacher (prepare + teacher)", "procs": procs,
            "threads_per_proc": threads, "epochs": args.epochs, "seconds": round(seconds, 1),
            "cpu": cpu_model(), "loadavg_1min_at_start": round(load, 2)}), sink)
    return paths


def library_runs(args: argparse.Namespace, work: Path, data_dir: Path, sink: list) -> tuple[dict[str, Path], dict]:
    from ssdd.precision import cpu_model

    me = [os.path.abspath(__file__), "--worker", "--epochs", str(args.epochs), "--data", str(data_dir)]
    plan = {"lib_bias_1t": ([sys.executable], 1, 1, "bias", True)}
    for variant in args.variants:
        plan[f"lib_{variant}_1t"] = ([sys.executable], 1, 1, variant, False)
        plan[f"lib_{variant}_2t"] = ([sys.executable], 2, 1, variant, False)
        if args.procs > 1 and variant in args.rank_variants:
            plan[f"lib_{variant}_{args.procs}r"] = (torchrun(args.procs), 1, args.procs, variant, False)
    paths, records = {}, {}
    for name, (launcher, threads, procs, variant, record) in plan.items():
        paths[name] = work / f"{name}.safetensors"
        if reused(args, paths[name], work / f"{name}.row.json", sink):
            records[name] = json.loads((work / f"{name}.row.json").read_text()).get("record")
            continue
        paths[name].unlink(missing_ok=True)
        load = os.getloadavg()[0]
        cmd = [*launcher, *me, "--threads", str(threads), "--variant", variant, "--save", str(paths[name])]
        seconds, stdout = run_cmd(cmd + (["--record"] if record else []), threads, work / f"{name}.log")
        worker_row = next(json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("WORKER "))
        records[name] = worker_row.pop("per_layer_median_over_steps", None)
        row = {"run": name, "route": "library train_barlow_twins", "variant": variant, **worker_row,
               "wall_seconds": round(seconds, 1), "cpu": cpu_model(), "loadavg_1min_at_start": round(load, 2)}
        stored(work / f"{name}.row.json", {**row, "record": records[name]})
        emit(row, sink)
    return paths, records


def growth(args: argparse.Namespace, work: Path, data_dir: Path, x: torch.Tensor, sink: list) -> dict:
    """Short trainings of N steps (one epoch on the first N batches): 2 threads and the torchrun ranks
    against 1 thread, as shipped (channels-last, biases) and NCHW without the biases."""
    from ssdd.precision import cpu_model

    me = [os.path.abspath(__file__), "--worker", "--epochs", "1", "--data", str(data_dir)]
    summary: dict = {}
    for variant in ("bias", "nchw_nobias"):
        for steps in args.growth_steps:
            plan = {"1t": ([sys.executable], 1), "2t": ([sys.executable], 2)}
            if args.procs > 1:
                plan[f"{args.procs}r"] = (torchrun(args.procs), 1)
            paths, start = {}, time.perf_counter()
            for name, (launcher, threads) in plan.items():
                paths[name] = work / f"growth_{variant}_{steps}_{name}.safetensors"
                run_cmd([*launcher, *me, "--threads", str(threads), "--variant", variant, "--subset-steps", str(steps),
                         "--save", str(paths[name])], threads, work / f"growth_{variant}_{steps}_{name}.log")
            rows = {}
            for name in plan:
                if name != "1t":
                    row = compare(paths[name], paths["1t"], x)
                    rows[f"{name}_vs_1t"] = {k: row[k] for k in ("rel_other_params", "rel_features_eval")}
            emit({"part": "growth", "variant": variant, "steps": steps, **rows,
                  "seconds_all_runs": round(time.perf_counter() - start, 1), "cpu": cpu_model()}, sink)
            summary.setdefault(variant, {})[steps] = rows
    return summary


# ---- analysis ---------------------------------------------------------------------------------

def fixed_batch(data_dir: Path) -> torch.Tensor:
    from ssdd.data import Normalizer
    from ssdd.data.dataset import load_dataset

    train = load_dataset(data_dir / "source_train.safetensors")
    heldout = load_dataset(data_dir / "source_heldout.safetensors")
    return Normalizer(*train.mean_std())(heldout.images[:FEATURE_IMAGES])


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor, train_mode: bool) -> torch.Tensor:
    model = to_nchw(copy.deepcopy(model)).train(train_mode)  # train mode updates the copy's running stats only
    return model.features(x.contiguous())


def compare(a_path: Path, b_path: Path, x: torch.Tensor) -> dict:
    from ssdd.models import encoder_from_artifact

    a, _ = encoder_from_artifact(a_path)
    b, _ = encoder_from_artifact(b_path)
    ga, gb = groups(a), groups(b)
    row = {f"rel_{k}": sig(rel(ga[k], gb[k])) for k in ga}
    row["bit_identical"] = all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    row["rel_features_eval"] = sig(rel(features(a, x, False), features(b, x, False)))
    row["rel_features_trainmode"] = sig(rel(features(a, x, True), features(b, x, True)))
    return row


def training_drift(path: Path, seed: int, lr: float) -> dict:
    """How far training moved each group from its initialisation (the scale a difference is judged
    against); the initial model is rebuilt as train_barlow_twins builds it (manual_seed, then build)."""
    from ssdd.models import build, encoder_from_artifact

    trained, meta = encoder_from_artifact(path)
    torch.manual_seed(seed)
    init = build(meta["model_spec"])
    if all(conv.bias.eq(0).all() for _, conv, _, _ in prenorm_convs(trained)):  # the no-bias variant
        with torch.no_grad():
            for _, conv, _, _ in prenorm_convs(init):
                conv.bias.zero_()
    gt, g0 = groups(trained), groups(init)
    out = {f"drift_{k}": sig(rel(gt[k], g0[k])) for k in ("conv_bias", "other_params")}
    out["conv_bias_walk_rms_over_lr"] = sig(rms(gt["conv_bias"] - g0["conv_bias"]) / lr)
    return out


def mechanism(data_dir: Path, cfg, sink: list) -> dict:
    """One batch of 64 images, the demo teacher + projector, the Barlow Twins loss: the conv-bias
    gradient (1 thread, 2 threads, fp64) and AdamW's first step on it."""
    from ssdd.data import Normalizer
    from ssdd.data.augment import ssl_views
    from ssdd.data.dataset import load_dataset
    from ssdd.models import build, model_spec
    from ssdd.models.ssl import barlow_twins_loss, projector

    data = load_dataset(data_dir / "source_train.safetensors")
    norm = Normalizer(*data.mean_std())
    tcfg = cfg.teacher
    summary = {}
    for label, norm_kind, layout in (("batch_channels_last", "batch", "channels_last"), ("batch_nchw", "batch", "nchw"),
                                     ("instance_channels_last", "instance", "channels_last")):
        torch.manual_seed(cfg.seed)
        spec = {**model_spec(tcfg.model, *data.shape[:2], out_dim=0), "norm": norm_kind}
        encoder = build(spec)
        if layout == "nchw":
            to_nchw(encoder)
        proj = projector(encoder.feature_dim, tcfg.projector)
        views = ssl_views(data.images[:1], tcfg.min_crop_scale, tcfg.hue)
        x = data.images[:64].float() / 255
        v1, v2 = norm.normalize_unit(views(x)), norm.normalize_unit(views(x))
        grads, steps = {}, {}
        for mode, threads, dtype in (("fp32_1t", 1, torch.float32), ("fp32_2t", 2, torch.float32), ("fp64", 1, torch.float64)):
            torch.set_num_threads(threads)
            e, p = copy.deepcopy(encoder).to(dtype), copy.deepcopy(proj).to(dtype)
            loss = barlow_twins_loss(p(e.features(v1.to(dtype))), p(e.features(v2.to(dtype))), tcfg.redundancy_weight)
            loss.backward()
            pairs = prenorm_convs(e)
            grads[mode] = [(conv.bias.grad.clone(), norm_layer.bias.grad.clone(), conv.weight.grad.clone())
                           for _, conv, _, norm_layer in pairs]
            opt = torch.optim.AdamW(list(e.parameters()) + list(p.parameters()), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
            before = [(conv.bias.detach().clone(), conv.weight.detach().clone()) for _, conv, _, _ in pairs]
            opt.step()
            steps[mode] = [(conv.bias.detach() - b0, conv.weight.detach() - w0) for (_, conv, _, _), (b0, w0) in zip(pairs, before)]
        torch.set_num_threads(1)
        layers = []
        for i in range(len(grads["fp32_1t"])):
            gb, gbeta, gw = grads["fp32_1t"][i]
            gb2, _, gw2 = grads["fp32_2t"][i]
            gb64, gbeta64, _ = grads["fp64"][i]
            db, dw = steps["fp32_1t"][i]
            db2, dw2 = steps["fp32_2t"][i]
            layers.append({
                "layer": i,
                "grad_bias_over_grad_bn_shift_fp32": sig(gb.norm().item() / gbeta.norm().item()),
                "grad_bias_over_grad_bn_shift_fp64": sig(gb64.norm().item() / gbeta64.norm().item()),
                "grad_bias_abs_median_fp32": sig(gb.abs().median().item()),
                "adam_eps": 1e-8,
                "grad_bias_sign_agreement_1t_vs_2t": sig((torch.sign(gb) == torch.sign(gb2)).double().mean().item()),
                "rel_grad_bias_1t_vs_2t": sig(rel(gb2, gb)),
                "rel_grad_weight_1t_vs_2t": sig(rel(gw2, gw)),
                "adamw_step_bias_rms_over_lr": sig(rms(db) / tcfg.lr),
                "adamw_step_weight_rms_over_lr": sig(rms(dw) / tcfg.lr),
                "rel_adamw_step_bias_1t_vs_2t": sig(rel(db2, db)),
                "rel_adamw_step_weight_1t_vs_2t": sig(rel(dw2, dw)),
            })
        emit({"part": "mechanism", "problem": "one batch of 64 mnist5k images, demo teacher + projector, Barlow Twins, "
              "AdamW first step", "norm": norm_kind, "layout": layout, "layers": layers}, sink)
        summary[label] = {k: sig(max(l[k] for l in layers)) for k in
                              ("grad_bias_over_grad_bn_shift_fp32", "grad_bias_over_grad_bn_shift_fp64")}
        summary[label].update({k: sig(min(l[k] for l in layers)) for k in ("adamw_step_bias_rms_over_lr",)})
        summary[label].update({k: sig(max(l[k] for l in layers)) for k in
                                   ("rel_grad_weight_1t_vs_2t", "rel_adamw_step_weight_1t_vs_2t")})
        summary[label].update({k: sig(min(l[k] for l in layers)) for k in
                                   ("rel_grad_bias_1t_vs_2t", "rel_adamw_step_bias_1t_vs_2t")})
    return summary


def gradient_chain(data_dir: Path, cfg, sink: list) -> dict:
    """Where the rounding noise of one training step's gradient comes from: one batch of the
    teacher's size (256), the relative difference 1 thread vs 2 threads and fp32 vs fp64 of the
    gradient at each stage from the loss back to the first conv, with the conv biases as
    initialised and zeroed; and |mean| / std over the batch of every normalisation layer's input
    (a large ratio: the mean subtraction cancels most of the digits)."""
    from ssdd.data import Normalizer
    from ssdd.data.augment import ssl_views
    from ssdd.data.dataset import load_dataset
    from ssdd.models import build, model_spec
    from ssdd.models.ssl import projector, standardize

    data = load_dataset(data_dir / "source_train.safetensors")
    norm = Normalizer(*data.mean_std())
    tcfg = cfg.teacher
    summary = {}
    for layout, biases in (("channels_last", "as_initialised"), ("channels_last", "zeroed"),
                           ("nchw", "as_initialised"), ("nchw", "zeroed")):
        torch.manual_seed(cfg.seed)
        encoder = build(model_spec(tcfg.model, *data.shape[:2], out_dim=0))
        if layout == "nchw":
            to_nchw(encoder)
        proj = projector(encoder.feature_dim, tcfg.projector)
        if biases == "zeroed":
            with torch.no_grad():
                for _, conv, _, _ in prenorm_convs(encoder):
                    conv.bias.zero_()
        views = ssl_views(data.images[:1], tcfg.min_crop_scale, tcfg.hue)
        x = data.images[:tcfg.batch].float() / 255
        v1, v2 = norm.normalize_unit(views(x)), norm.normalize_unit(views(x))
        grads, ratios = {}, {}
        for mode, threads, dtype in (("1t", 1, torch.float32), ("2t", 2, torch.float32), ("fp64", 1, torch.float64)):
            torch.set_num_threads(threads)
            e, p = copy.deepcopy(encoder).to(dtype), copy.deepcopy(proj).to(dtype)
            seen: dict[str, torch.Tensor] = {}
            first_view = [True]  # hooks record the first view's pass only

            def keep(name: str):
                def hook(module, inputs, output):
                    if not first_view[0]:
                        return
                    output.retain_grad()
                    seen[name] = output
                    if isinstance(module, NORMS) and dtype == torch.float64:
                        x_in = inputs[0].detach()
                        dims = [0] + list(range(2, x_in.dim()))
                        ratios[name] = x_in.mean(dims).abs().div(x_in.std(dims)).median().item()
                return hook

            for name, module in [*((f"backbone.{n}", m) for n, m in e.backbone.named_children()),
                                 *((f"projector.{n}", m) for n, m in p.named_children())]:
                if isinstance(module, (nn.Conv2d, nn.Linear, *NORMS)):
                    module.register_forward_hook(keep(f"{name}:{type(module).__name__}"))
            f1 = e.features(v1.to(dtype))
            f1.retain_grad()
            z1 = p(f1)
            first_view[0] = False
            z2 = p(e.features(v2.to(dtype)))
            s1, s2 = standardize(z1), standardize(z2)
            s1.retain_grad()
            c = s1.T @ s2 / len(s1)
            diag = torch.diagonal(c)
            loss = (diag - 1).pow(2).sum() + tcfg.redundancy_weight * (c.pow(2).sum() - diag.pow(2).sum())
            loss.backward()
            stages = {"loss": loss.detach().reshape(1), "d_standardized_z": s1.grad}
            for name in reversed([k for k in seen if k.startswith("projector")]):  # the last one's output is z
                stages[f"d_out {name}"] = seen[name].grad
            stages["d_features"] = f1.grad
            for name in reversed([k for k in seen if k.startswith("backbone")]):
                stages[f"d_out {name}"] = seen[name].grad
            for name, conv, _, _ in prenorm_convs(e):
                stages[f"d_weight {name}"] = conv.weight.grad
            grads[mode] = {k: v.detach().clone() for k, v in stages.items() if v is not None}
        torch.set_num_threads(1)
        chain = [{"stage": k, "rel_1t_vs_2t": sig(rel(grads["2t"][k], grads["1t"][k])),
                  "rel_fp32_vs_fp64": sig(rel(grads["1t"][k], grads["fp64"][k]))} for k in grads["1t"]]
        emit({"part": "gradient_chain", "batch": tcfg.batch, "layout": layout, "conv_biases": biases,
              "input_abs_mean_over_std_median": {k: sig(v) for k, v in ratios.items()}, "chain": chain}, sink)
        summary[f"{layout}/{biases}"] = {row["stage"]: row["rel_fp32_vs_fp64"] for row in chain
                           if row["stage"] in ("loss", "d_features") or row["stage"].startswith("d_weight")}
    return summary


def batchnorm_kernel(sink: list) -> dict:
    """torch's own BatchNorm2d (training mode, 1 thread) on random activations shaped like the
    demo's first and last blocks, fp32 against fp64, in the NCHW and channels-last layouts."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for shape in ((256, 32, 32, 32), (256, 128, 8, 8)):
        x = torch.randn(shape, generator=gen) * 0.45 + 0.13
        dy = torch.randn(shape, generator=gen)
        x64 = x.double().requires_grad_()
        y64 = nn.BatchNorm2d(shape[1]).double()(x64)
        y64.backward(dy.double())
        row = {}
        for layout, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            xx = x.clone(memory_format=fmt).requires_grad_()
            y = nn.BatchNorm2d(shape[1])(xx)
            y.backward(dy.contiguous(memory_format=fmt))
            row[layout] = {"rel_output": sig(rel(y.detach(), y64.detach())), "rel_input_grad": sig(rel(xx.grad, x64.grad))}
        emit({"part": "batchnorm_kernel", "shape": list(shape), "what": "torch BatchNorm2d fp32 vs fp64, train mode",
              **row}, sink)
        out["x".join(map(str, shape))] = row
    return out


@contextlib.contextmanager
def convnet_without_bias():
    """``ssdd.models.convnet`` building its convolutions with ``bias=False`` (no edit to src/)."""
    import ssdd.models.convnet as convnet_module

    class Conv2dNoBias(nn.Conv2d):
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "bias": False})

    proxy = types.ModuleType("nn_without_conv_bias")
    proxy.__dict__.update(nn.__dict__)
    proxy.Conv2d = Conv2dNoBias
    saved = convnet_module.nn
    convnet_module.nn = proxy
    try:
        yield
    finally:
        convnet_module.nn = saved


def removal_facts(teacher_path: Path, x: torch.Tensor, walk_rms: float, sink: list) -> dict:
    """What removing the bias for real changes, and what a bias does in eval mode."""
    from ssdd.models import build, encoder_from_artifact

    trained, meta = encoder_from_artifact(teacher_path)
    spec = meta["model_spec"]
    torch.manual_seed(0)
    with_bias = build(spec)
    with convnet_without_bias():
        torch.manual_seed(0)
        without = build(spec)
    convs_a = [m for m in with_bias.modules() if isinstance(m, nn.Conv2d)]
    convs_b = [m for m in without.modules() if isinstance(m, nn.Conv2d)]
    facts = {"part": "removal", "same_init_weights_per_conv_with_bias_False": [torch.equal(a.weight, b.weight)
                                                                          for a, b in zip(convs_a, convs_b)],
             "state_dict_keys_gone": sorted(set(with_bias.state_dict()) - set(without.state_dict()))}
    missing, unexpected = without.load_state_dict(trained.state_dict(), strict=False)
    facts.update(old_artifact_into_bias_free_model_unexpected_keys=sorted(unexpected), missing=sorted(missing))
    # eval mode: the bias only enters through (bias - running_mean); folding it into the running mean
    # gives the same function ...
    reference = features(trained, x, False)
    folded = copy.deepcopy(trained)
    with torch.no_grad():
        for _, conv, _, bn in prenorm_convs(folded):
            bn.running_mean -= conv.bias
            conv.bias.zero_()
    facts["rel_features_eval_bias_folded_into_running_mean"] = sig(rel(features(folded, x, False), reference))
    # ... but a bias step the running mean has not seen moves eval-mode features (train mode: nothing)
    gen = torch.Generator().manual_seed(1)
    moved = copy.deepcopy(trained)
    with torch.no_grad():
        for _, conv, _, _ in prenorm_convs(moved):
            conv.bias += walk_rms * torch.randn(conv.bias.shape, generator=gen)
    facts["bias_shift_rms"] = sig(walk_rms)
    facts["rel_features_eval_after_bias_shift_unseen_by_running_mean"] = sig(rel(features(moved, x, False), reference))
    facts["rel_features_trainmode_after_bias_shift"] = sig(rel(features(moved, x, True), features(trained, x, True)))
    emit(facts, sink)
    return {k: v for k, v in facts.items() if k.startswith("rel_") or k == "bias_shift_rms"}


def same_prepared_data(paths: list[Path]) -> bool:
    """The CLI runs' prepared images and their fp32 normalisation constants are the same (the fp64
    mean/std in the file may differ in the last bit with the thread count)."""
    from ssdd.artifacts import load_tensors

    first, meta = load_tensors(paths[0])
    for path in paths[1:]:
        other, other_meta = load_tensors(path)
        if not torch.equal(first["images"], other["images"]) or any(
                not torch.equal(torch.tensor(meta[k]), torch.tensor(other_meta[k])) for k in ("mean", "std")):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1, help="teacher epochs (mnist5k: 17 steps each)")
    parser.add_argument("--procs", type=int, default=2, help="torchrun ranks (1 thread each); 1 = no torchrun runs")
    parser.add_argument("--variants", nargs="*", default=["nobias", "nchw", "nchw_nobias"],
                        choices=["nobias", "nchw", "nchw_nobias"], help="library-route variants, 1 and 2 threads each")
    parser.add_argument("--rank-variants", nargs="*", default=["nobias", "nchw", "nchw_nobias"],
                        help="of those, the ones also run under torchrun")
    parser.add_argument("--work", default="/tmp/ssdd-rank-equality", help="scratch folder for the runs")
    parser.add_argument("--jsonl", help="also append every line printed to this file")
    parser.add_argument("--reuse", action="store_true", help="keep teachers already in --work (analysis only)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="bias", help=argparse.SUPPRESS)
    parser.add_argument("--record", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--grad-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--subset-steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--growth-steps", type=int, nargs="*", default=[1, 4],
                        help="short trainings (one epoch of this many steps) showing how the difference grows")
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.grad_worker:
        grad_worker(args)
        return
    sys.path.insert(0, str(ROOT / "src"))
    from ssdd.precision import cpu_model

    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sink: list[str] = []
    cfg = teacher_config(args.epochs)
    emit({"benchmark": "rank_equality", "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
          "preset": "demo", "teacher": {"widths": cfg.teacher.model.widths, "optimizer": cfg.teacher.optimizer,
                                        "lr": cfg.teacher.lr, "weight_decay": cfg.teacher.weight_decay,
                                        "batch": cfg.teacher.batch, "epochs": args.epochs},
          "precision": "fp32", "device": "cpu", "procs": args.procs}, sink)

    cli = cli_runs(args, work, sink)
    data_dir = work / "cli_1t" / "data"
    same_data = same_prepared_data([work / name / "data" / "source_train.safetensors" for name in cli])
    lib, records = library_runs(args, work, data_dir, sink)
    if records.get("lib_bias_1t"):
        emit({"part": "real_run_record", "run": "lib_bias_1t", "what": "median over all training steps, per conv layer",
              "layers": records["lib_bias_1t"]}, sink)

    bn_kernel = batchnorm_kernel(sink)
    one_step = one_step_gradients(args, work, data_dir, sink)
    mech = mechanism(data_dir, cfg, sink)
    chain = gradient_chain(data_dir, cfg, sink)
    x = fixed_batch(data_dir)
    grown = growth(args, work, data_dir, x, sink) if args.growth_steps else {}
    ranks = f"{args.procs}r"
    pairs: dict[str, dict[str, tuple[Path, Path]]] = {"bias": {"2t_vs_1t": (cli["cli_2t"], cli["cli_1t"])}}
    if args.procs > 1:
        pairs["bias"].update({f"{ranks}_vs_1t": (cli[f"cli_{ranks}"], cli["cli_1t"]),
                              f"{ranks}_vs_2t": (cli[f"cli_{ranks}"], cli["cli_2t"])})
    for variant in args.variants:
        pairs[variant] = {"2t_vs_1t": (lib[f"lib_{variant}_2t"], lib[f"lib_{variant}_1t"])}
        if f"lib_{variant}_{ranks}" in lib:
            pairs[variant].update({f"{ranks}_vs_1t": (lib[f"lib_{variant}_{ranks}"], lib[f"lib_{variant}_1t"]),
                                   f"{ranks}_vs_2t": (lib[f"lib_{variant}_{ranks}"], lib[f"lib_{variant}_2t"])})
    pairs["controls"] = {"lib_bias_1t_vs_cli_1t": (lib["lib_bias_1t"], cli["cli_1t"])}
    for variant in args.variants:  # the same mathematics as the CLI's 1-thread run, other rounding
        pairs["controls"][f"{variant}_1t_vs_bias_1t"] = (lib[f"lib_{variant}_1t"], cli["cli_1t"])
    table: dict[str, dict] = {}
    for variant, comparisons in pairs.items():
        for label, (a, b) in comparisons.items():
            row = compare(a, b, x)
            table.setdefault(variant, {})[label] = row
            emit({"part": "compare", "variant": variant, "pair": label, "a": a.parent.name if a.name == "teacher.safetensors"
                  else a.stem, "b": b.parent.name if b.name == "teacher.safetensors" else b.stem, **row}, sink)
    drift = {"bias": training_drift(cli["cli_1t"], cfg.seed, cfg.teacher.lr),
             **{v: training_drift(lib[f"lib_{v}_1t"], cfg.seed, cfg.teacher.lr) for v in args.variants}}
    emit({"part": "training_drift", "what": "||trained - init|| / ||init|| (the scale of a difference)", **drift}, sink)
    walk = drift["bias"]["conv_bias_walk_rms_over_lr"] * cfg.teacher.lr
    removal = removal_facts(cli["cli_1t"], x, walk, sink)

    keys = ("rel_conv_bias", "rel_other_params", "rel_running_mean", "rel_features_eval", "rel_features_trainmode",
            "bit_identical")
    emit({"summary": "rank_equality", "cpu": cpu_model(), "epochs": args.epochs, "procs": args.procs,
          "same_prepared_images_and_fp32_normaliser_in_every_cli_run": same_data,
          "teachers": {v: {p: {k: r[k] for k in keys} for p, r in rows.items()} for v, rows in table.items()},
          "growth_short_runs": grown,
          "training_drift": drift, "mechanism_one_batch": mech,
          "gradient_rel_error_fp32_vs_fp64_one_step": chain, "one_step_gradient_vs_fp64": one_step,
          "batchnorm_kernel_fp32_vs_fp64": bn_kernel,
          "removal": removal}, sink)
    if args.jsonl:
        path = Path(args.jsonl)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write("\n".join(sink) + "\n")


if __name__ == "__main__":
    main()
