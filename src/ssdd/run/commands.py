"""Commands beside ``ssdd run``: the stages on their own, from files (``ssdd prepare SOURCE``, ``ssdd pretrain
--distilled``, ``ssdd evaluate --encoder``), ``ssdd diagnose`` and ``ssdd compare``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from ssdd import artifacts, determinism, distilled_set, layout, live_log, precision
from ssdd.compare import comparison
from ssdd.config import Config
from ssdd.data import save_dataset
from ssdd.data.formats import read_source
from ssdd.data.sources import load_target
from ssdd.distill import registry
from ssdd.errors import UserError
from ssdd.evaluate import Target, evaluate_encoder
from ssdd.models import build, encoder_from_artifact, model_spec
from ssdd.paper_table import read_paper_table
from ssdd.pretrain import pretrain_set
from ssdd.report_html import write_comparison, write_reports
from ssdd.run.core import Run
from ssdd.run.setup import resolve_device, run_precision, single_process
from ssdd.run.stages.distill import distill_context
from ssdd.run.stages.evaluate import write_results
from ssdd.run.stages.report import INTERVAL_NOTE

log = logging.getLogger("ssdd")


def prepare_file(source: str, fmt: str, size: int, out: str | Path, split: str = "train",
                 max_per_class: int | None = None, image_column: str | None = None,
                 label_column: str | None = None, progress: bool = False) -> Path:
    """``ssdd prepare SOURCE --format FMT``: one raw dataset split -> one canonical dataset file
    (``image_column``/``label_column``: an ``hf`` dataset's columns)."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give the dataset file to write (e.g. {out}/train.safetensors)")
    if size <= 0:
        raise UserError(f"--size must be positive, got {size}")
    data = read_source(source, fmt, size, split, max_per_class, image_column=image_column,
                       label_column=label_column, progress=progress)
    save_dataset(out, data, {"source": str(source), "format": fmt, "split": split})
    log.info("prepared %d images %s (%d classes) -> %s", len(data), list(data.shape), data.num_classes, out)
    return out


def pretrain_file(cfg: Config, distilled: str | Path, out: str | Path, device: str = "auto",
                  progress: bool = True) -> Path:
    """``ssdd pretrain --distilled FILE``: encoders for each seed from one distilled set, by the one recipe of
    ``pretrain.recipes`` (choosing among several needs a target: that is the pipeline's ``pretrain`` stage)."""
    single_process("ssdd pretrain --distilled")
    if len(cfg.pretrain.recipes) != 1:
        raise UserError(f"ssdd pretrain --distilled: pretrain.recipes must name one recipe here, got "
                        f"{cfg.pretrain.recipes} (the choice among several runs in `ssdd run` / `ssdd compare`)")
    out, dev, logs = Path(out), resolve_device(device), {}
    determinism.configure(cfg.deterministic, dev)
    method = distilled_set.method_of(distilled)
    with live_log.opened(cfg.log, layout.live_log_dir(out)):
        for k in range(cfg.evaluate.seeds):
            with precision.use(run_precision(cfg, dev)), live_log.scope(f"pretrain/{layout.pretrain_log_key(method, k)}"):
                encoder, curve, spec = pretrain_set(cfg, distilled, cfg.seed + k, dev, progress,
                                                    recipe_name=cfg.pretrain.recipes[0])
            artifacts.save_encoder(layout.encoder_path(out, method, k), encoder, spec,
                                   {"method": method, "seed": cfg.seed + k, "distilled_set": Path(distilled).name,
                                    "loss_curve": curve})
            logs[layout.pretrain_log_key(method, k)] = curve
    artifacts.write_json(layout.pretrain_log_path(out), {"epoch_loss": logs})
    return out


def evaluate_files(cfg: Config, encoders: list[str], targets: list[str], out: str | Path, device: str = "auto",
                   progress: bool = True) -> Path:
    """``ssdd evaluate --encoder E... --targets T...``: the transfer suite on artifacts, then the report."""
    single_process("ssdd evaluate --encoder")
    if "kd" in cfg.evaluate.protocols:  # kd trains each student on its own distilled set, which an encoder file lacks
        raise UserError("--protocols kd: needs each encoder's distilled set and the run folder it came from; "
                        "evaluate kd with `ssdd run` or `ssdd evaluate --out RUN_FOLDER`")
    out, dev = Path(out), str(resolve_device(device))
    determinism.configure(cfg.deterministic, dev)
    names = layout.unique_target_names(targets)
    loaded = [(t, *load_target(t, cfg.data.size, cfg.evaluate.test_split, cfg.data.target_max_per_class or None))
              for t in targets]
    suite = [Target(names[spec], train, test) for spec, train, test in loaded]
    rows, methods = [], []
    with live_log.opened(cfg.log, layout.live_log_dir(out)):
        for path in encoders:
            for k in range(cfg.evaluate.seeds):
                if path == "none":
                    torch.manual_seed(cfg.seed + k)
                    c, h, _ = suite[0].train.shape
                    encoder, method = build(model_spec(cfg.model, c, h, 0)), "no_pretrain"
                else:
                    encoder, meta = encoder_from_artifact(path, dev)
                    method = str(meta.get("method", Path(path).stem))
                methods.append(method)
                for target in suite:
                    with precision.use(run_precision(cfg, dev)), live_log.scope(f"finetune/{method}/{target.name}/seed{k}"):
                        rows += evaluate_encoder(method, cfg.seed + k, encoder.to(dev), target, cfg.evaluate, dev,
                                                 progress)
    write_results(out, rows)
    return write_reports(out, methods=list(dict.fromkeys(methods)))


def diagnose_grad_variance(cfg: Config, out: str | Path, draws: int = 16, device: str = "auto",
                           progress: bool = True) -> Path:
    """``ssdd diagnose grad-variance``: prepare and teacher as needed, then the outer-gradient variance of
    naive bilevel SSL vs KRR-ST at the first seed's initial state (``grad_variance.json`` / ``.png``)."""
    from ssdd.distill.diagnose import write_grad_variance

    run = Run(cfg, out, device, progress)
    run.run(until="teacher")
    ctx = distill_context(run, run.inputs.source("train"), run.inputs.source("heldout"), cache={})
    with precision.use(run.precision):
        write_grad_variance(ctx, Path(out), draws)
    return Path(out)


def diagnose_images_vs_targets(cfg: Config, out: str | Path, method: str = "krr_st", k: int = 0,
                               device: str = "auto", progress: bool = True) -> list[Path]:
    """``ssdd diagnose images-vs-targets``: split the held-out gain of ``method``'s set at seed ``k`` (made by
    ``ssdd distill`` in ``out`` for this config) into images and targets; writes
    ``images_vs_targets.<method>[.seed<k>].json`` / ``.txt`` / ``.png`` in ``out`` and prints the table."""
    import dataclasses

    from ssdd.distill.diagnose_gain import format_table, gain_split, write_gain_split
    from ssdd.run.stages.distill import for_seed

    if k < 0:
        raise UserError(f"--seed-index must be 0 or more, got {k}")
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"--out {out}: no such run folder; run `ssdd distill` into it first")
    run = Run(cfg, out, device, progress)
    artifact = distilled_set.load(run.inputs.distilled_set(registry.get(method), k))
    base = distill_context(run, run.inputs.source("train"), run.inputs.source("heldout"), cache={})
    ctx = dataclasses.replace(for_seed(run, base, k), heldout=base.heldout)  # the check at any seed, not only the first
    if artifact.meta.get("seed", ctx.seed) != ctx.seed:
        raise UserError(f"{artifact.path}: made with seed {artifact.meta['seed']}, expected {ctx.seed} (seed + {k})")
    with precision.use(run.precision):  # as the distill stage ran the method's own check
        result = gain_split(ctx, artifact)
    paths = write_gain_split(result, out, f"images_vs_targets.{method}{layout.seed_suffix(k)}")
    print(format_table(result), end="")
    log.info("diagnose images-vs-targets: %s", ", ".join(str(p) for p in paths))
    return paths


def run_compare(cfg: Any, out: str | Path, paper_table: str | Path | None = None, device: str = "auto",
                progress: bool = True, baseline: str = "random_subset") -> Path:
    """Run whatever the configured methods still miss in ``out`` (each finished method, seed, encoder
    and evaluation is reused, an interrupted one resumes), then write the comparison table."""
    if paper_table is not None:
        read_paper_table(paper_table)  # a bad file fails before hours of work
    if baseline not in cfg.methods:
        raise UserError(f"compare: the baseline '{baseline}' must be among the methods ({', '.join(cfg.methods)})")
    out, start = Path(out), time.perf_counter()
    run = Run(cfg, out, device, progress)
    run.run()
    times = layout.read_timings(out)
    wall: dict[str, Any] = {}
    for name in cfg.methods:
        method = registry.get(name)
        if method.kind != "set":
            continue
        parts = {f"distill ({len(run.plan.seeds())} seeds)": sum(times.get(layout.distill_timing_key(name, k), 0.0)
                                                           for k in run.plan.seeds())}
        for prep in run.plan.active_preps(method):
            parts[f"{prep} (shared)"] = times.get(layout.prep_timing_key(prep), 0.0)
        wall[name] = parts
    rows = artifacts.read_json(layout.results_paths(out)[0])
    storage = {m.name: distilled_set.stored_numbers(layout.distilled_path(out, m.name, 0))
               for m in run.plan.set_methods() if layout.distilled_path(out, m.name, 0).is_file()}
    comp = comparison(rows, cfg.methods, baseline, paper_table, storage)
    path = write_comparison(out, comp, wall, INTERVAL_NOTE)  # compare.md/.csv/.json/.png and compare.html
    log.info("compare: %s (this invocation %.1f s)", path, time.perf_counter() - start)
    return path
