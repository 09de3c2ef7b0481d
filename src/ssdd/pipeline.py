"""`ssdd run`: the stages in order, each writing its artifacts into one output folder and
skipped when its artifacts exist for the same configuration.

Each stage saves the resolved config beside its artifacts (``config.<stage>.json``) with a
fingerprint of the config sections it and its upstream stages depend on.
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
import time
from pathlib import Path

import torch

from ssdd import artifacts, report
from ssdd.config import Config, fingerprint, to_dict
from ssdd.data import ImageSet, Normalizer, load_dataset, load_source, save_dataset, stratified_split
from ssdd.data.bundled import BUNDLED, load_bundled
from ssdd.distill import distill_krr_st, heldout_batches, heldout_losses, initial_set
from ssdd.errors import UserError
from ssdd.evaluate import Target, evaluate_encoder
from ssdd.models import build, encoder_from_artifact, model_spec
from ssdd.pretrain import pretrain_encoder
from ssdd.teacher import load_teacher, train_barlow_twins

log = logging.getLogger("ssdd")

STAGES = ("prepare", "teacher", "distill", "pretrain", "evaluate", "report")
# The config sections each stage depends on (its own and those upstream).
SECTIONS = {
    "prepare": ("seed", "data"),
    "teacher": ("seed", "data", "teacher"),
    "distill": ("seed", "data", "teacher", "model", "distill"),
    "pretrain": ("seed", "data", "teacher", "model", "distill", "pretrain", "evaluate.seeds"),
    "evaluate": ("seed", "data", "teacher", "model", "distill", "pretrain", "evaluate"),
    "report": ("seed", "data", "teacher", "model", "distill", "pretrain", "evaluate"),
}
METHODS = ("krr_st", "random_subset", "no_pretrain", "full_ssl")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def encoder_path(out: Path, method: str, k: int) -> Path:
    """``encoders/<method>.safetensors`` for the first seed, ``<method>.seed<k>.safetensors`` after."""
    return out / "encoders" / (f"{method}.safetensors" if k == 0 else f"{method}.seed{k}.safetensors")


class Run:
    """One pipeline run in one output folder."""

    def __init__(self, cfg: Config, out: str | Path, device: str = "auto", progress: bool = True):
        self.cfg, self.out, self.device, self.progress = cfg, Path(out), resolve_device(device), progress
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out}: exists and is a file, expected a folder")
        self.data_dir = self.out / "data"

    # ---- bookkeeping ------------------------------------------------------------------
    def _section_fingerprint(self, stage: str) -> str:
        full = to_dict(self.cfg)
        picked = {}
        for key in SECTIONS[stage]:
            value = full
            for part in key.split("."):
                value = value[part]
            picked[key] = value
        return fingerprint(picked)

    def outputs(self, stage: str) -> list[Path]:
        o, seeds = self.out, range(self.cfg.evaluate.seeds)
        return {
            "prepare": [self.data_dir / "source_train.safetensors", self.data_dir / "source_heldout.safetensors"]
            + [p for t in self.cfg.data.targets for p in self.target_paths(t)],
            "teacher": [o / "teacher.safetensors"],
            "distill": [o / "distilled.safetensors", o / "random_subset.safetensors", o / "distill_log.json",
                        o / "distill_check.json"],
            "pretrain": [encoder_path(o, m, k) for m in METHODS[:3] for k in seeds]
            + [encoder_path(o, "full_ssl", 0), o / "pretrain_log.json"],
            "evaluate": [o / "results.json", o / "results.csv"],
            "report": [o / "report.md"],
        }[stage]

    def target_paths(self, target: str) -> tuple[Path, Path]:
        name = Path(target).stem if target not in BUNDLED else target
        return self.data_dir / f"target_{name}_train.safetensors", self.data_dir / f"target_{name}_test.safetensors"

    def is_done(self, stage: str) -> bool:
        sidecar = self.out / f"config.{stage}.json"
        if not sidecar.is_file() or not all(p.exists() for p in self.outputs(stage)):
            return False
        try:
            return artifacts.read_json(sidecar).get("fingerprint") == self._section_fingerprint(stage)
        except UserError:
            return False

    def mark_done(self, stage: str) -> None:
        artifacts.write_json(self.out / f"config.{stage}.json",
                             {"stage": stage, "fingerprint": self._section_fingerprint(stage), "config": to_dict(self.cfg)})

    def run(self, until: str | None = None, only: str | None = None) -> None:
        if until is not None and until not in STAGES:
            raise UserError(f"--until: unknown stage '{until}' (stages: {', '.join(STAGES)})")
        stages = [only] if only else STAGES[:STAGES.index(until) + 1] if until else STAGES
        for stage in stages:
            if self.is_done(stage):
                log.info("%-8s skipped: artifacts exist for this config", stage)
                continue
            start = time.perf_counter()
            getattr(self, f"stage_{stage}")()
            self.mark_done(stage)
            log.info("%-8s done in %.1f s", stage, time.perf_counter() - start)

    # ---- stages -----------------------------------------------------------------------
    def stage_prepare(self) -> None:
        data = self.cfg.data
        source = load_source(data.source, data.size)
        if data.heldout >= len(source):
            raise UserError(f"config: data.heldout={data.heldout} leaves no source images ({len(source)} in all)")
        order = torch.randperm(len(source), generator=torch.Generator().manual_seed(self.cfg.seed))
        unlabeled = ImageSet(source.images, None, [], source.name)  # the source's labels are never read
        save_dataset(self.data_dir / "source_train.safetensors", unlabeled.subset(order[data.heldout:]))
        save_dataset(self.data_dir / "source_heldout.safetensors", unlabeled.subset(order[:data.heldout]))
        for target in data.targets:
            full = load_bundled(target, data.size) if target in BUNDLED else load_source(target, data.size)
            if full.labels is None:
                raise UserError(f"target {target}: has no labels")
            train_idx, test_idx = stratified_split(full.labels, self.cfg.evaluate.test_split, seed=0)
            train_path, test_path = self.target_paths(target)
            save_dataset(train_path, full.subset(train_idx))
            save_dataset(test_path, full.subset(test_idx))

    def _source(self, part: str) -> ImageSet:
        path = self.data_dir / f"source_{part}.safetensors"
        if not path.is_file():
            raise UserError(f"{path}: not found; run `ssdd prepare` into this --out folder first")
        return load_dataset(path)

    def _source_norm(self, train: ImageSet) -> Normalizer:
        """Real and synthetic images share the source's normalised space."""
        return Normalizer(*train.mean_std(), device=self.device)

    def stage_teacher(self) -> None:
        data = self._source("train")
        norm = self._source_norm(data)
        if self.cfg.teacher.path:
            load_teacher(self.cfg.teacher.path, data.shape[0], data.shape[1], self.device)  # checks it fits
            shutil.copyfile(self.cfg.teacher.path, self.out / "teacher.safetensors")
            return
        result = train_barlow_twins(data, norm, self.cfg.teacher, self.cfg.seed, self.device, self.progress)
        artifacts.save_encoder(self.out / "teacher.safetensors", result.encoder, result.spec,
                               {"method": "barlow_twins", "source": self.cfg.data.source, "seed": self.cfg.seed,
                                "loss_curve": result.losses})

    def _teacher(self, channels: int, size: int):
        path = self.out / "teacher.safetensors"
        if not path.is_file():
            raise UserError(f"{path}: not found; run `ssdd teacher` into this --out folder first")
        return load_teacher(path, channels, size, self.device)

    def stage_distill(self) -> None:
        cfg = self.cfg
        source, heldout = self._source("train"), self._source("heldout")
        norm = self._source_norm(source)
        c, h, _ = source.shape
        teacher, dim, _ = self._teacher(c, h)
        spec = model_spec(cfg.model, c, h, out_dim=dim)
        result = distill_krr_st(source, teacher, norm, spec, cfg.distill, cfg.seed, self.device, self.progress)
        if not (torch.isfinite(result.images).all() and torch.isfinite(result.targets).all()):
            raise RuntimeError("distillation diverged: the synthetic set holds NaN/inf; lower distill.lr_images")
        meta = {"source": cfg.data.source, "teacher": str(self.out / "teacher.safetensors"), "seed": cfg.seed,
                "image_space": cfg.distill.image_space, "mean": norm.mean.flatten().tolist(),
                "std": norm.std.flatten().tolist(), "model_spec": spec, "config": to_dict(cfg)}
        space_note = ("normalised: (pixel/255 - mean) / std" if cfg.distill.image_space == "normalized"
                      else "reference: raw pixel/255 in [0,1], not normalised (as the reference code)")
        meta["image_space_note"] = space_note
        artifacts.save_distilled(self.out / "distilled.safetensors", result.images, result.targets,
                                 {**meta, "method": "krr_st", "steps": cfg.distill.steps,
                                  "init_index": result.init_index.tolist()})
        artifacts.save_distilled(self.out / "random_subset.safetensors", result.init_images, result.init_targets,
                                 {**meta, "method": "random_subset", "steps": 0,
                                  "init_index": result.init_index.tolist()})
        artifacts.write_json(self.out / "distill_log.json", {"loss": result.losses, "pool_reinits": result.pool_reinits})
        batches = heldout_batches(heldout, teacher, norm, cfg.distill, cfg.seed + 7, self.device)
        _, other_images, other_targets = initial_set(source, teacher, norm, cfg.distill.m, cfg.seed + 13,
                                                     cfg.distill.image_space, self.device)
        losses = heldout_losses({"distilled": (result.images, result.targets),
                                 "init": (result.init_images, result.init_targets),
                                 "other": (other_images, other_targets)},
                                batches, spec, cfg.distill, cfg.seed, self.device)
        artifacts.write_json(self.out / "distill_check.json", {
            "heldout_loss_init": losses["init"],
            "heldout_loss_distilled": losses["distilled"],
            "heldout_loss_random_subset": losses["init"],
            "heldout_loss_other_random_subset": losses["other"],
            "note": "random_subset is the distillation's initial images with teacher targets, so its loss equals "
                    "heldout_loss_init by construction; heldout_loss_other_random_subset is an independent draw "
                    f"of m={cfg.distill.m} images. Measured on {cfg.distill.check_batches} fixed augmented "
                    f"batches of {len(heldout)} held-out images with {cfg.distill.check_models} fresh models.",
        })

    def stage_pretrain(self) -> None:
        cfg, logs = self.cfg, {}
        for method in ("krr_st", "random_subset"):
            path = self.out / ("distilled.safetensors" if method == "krr_st" else "random_subset.safetensors")
            if not path.is_file():
                raise UserError(f"{path}: not found; run `ssdd distill` into this --out folder first")
            images, targets, meta = artifacts.load_distilled(path)
            spec = meta["model_spec"]
            for k in range(cfg.evaluate.seeds):
                encoder, curve = pretrain_encoder(images, targets, spec, cfg.pretrain, cfg.seed + k, self.device,
                                                  self.progress, desc=f"pretrain {method} s{k}")
                logs[f"{method}/seed{k}"] = curve
                artifacts.save_encoder(encoder_path(self.out, method, k), encoder, {**spec, "out_dim": targets.shape[1]},
                                       {"method": method, "seed": cfg.seed + k, "distilled_set": str(path)})
        for k in range(cfg.evaluate.seeds):
            torch.manual_seed(cfg.seed + k)
            encoder = build(spec)
            artifacts.save_encoder(encoder_path(self.out, "no_pretrain", k), encoder, spec,
                                   {"method": "no_pretrain", "seed": cfg.seed + k})
        shutil.copyfile(self.out / "teacher.safetensors", encoder_path(self.out, "full_ssl", 0))
        artifacts.write_json(self.out / "pretrain_log.json", {"epoch_loss": logs})

    def _targets(self) -> list[Target]:
        out = []
        for target in self.cfg.data.targets:
            train_path, test_path = self.target_paths(target)
            name = Path(target).stem if target not in BUNDLED else target
            out.append(Target(name, load_dataset(train_path), load_dataset(test_path)))
        return out

    def stage_evaluate(self) -> None:
        rows = evaluate_all(self.out, METHODS, self.cfg, self._targets(), str(self.device), self.progress)
        write_results(self.out, rows)

    def stage_report(self) -> None:
        report.write_report(self.out)


def evaluate_all(out: Path, methods: tuple[str, ...], cfg: Config, targets: list[Target], device: str,
                 progress: bool) -> list[dict]:
    """Each method's encoder for each seed (full_ssl: one encoder, seeds vary the evaluation only)."""
    rows = []
    for k in range(cfg.evaluate.seeds):
        for method in methods:
            path = encoder_path(out, method, k)
            path = path if path.exists() else encoder_path(out, method, 0)
            encoder, _ = encoder_from_artifact(path, device)
            for target in targets:
                rows += evaluate_encoder(method, cfg.seed + k, encoder, target, cfg.evaluate, device, progress)
    return rows


def write_results(out: Path, rows: list[dict]) -> None:
    artifacts.write_json(out / "results.json", rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["method"])
    writer.writeheader()
    writer.writerows(rows)
    artifacts.write_bytes(out / "results.csv", buf.getvalue().encode())


def run_pipeline(cfg: Config, out: str | Path, until: str | None = None, only: str | None = None,
                 device: str = "auto", progress: bool = True) -> Path:
    Run(cfg, out, device, progress).run(until=until, only=only)
    return Path(out)

