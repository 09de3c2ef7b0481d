"""`ssdd run`: the stages in order for the configured methods, each writing its artifacts into one
output folder and skipped when they exist for the same configuration.

Two levels of reuse. Each stage saves the resolved config beside its artifacts
(``config.<stage>.json``) with a fingerprint of the config sections it depends on. Inside a stage,
every artifact (a distilled set per method and seed, an encoder, one evaluation unit) carries the
fingerprint of exactly the keys it depends on, so adding a method, a seed or a target redoes only
what is new, and a finished method is never redone.

Seeds: seed k (k < evaluate.seeds) is one distillation per method from the paired random draw of
seed ``seed + k``, its random_subset (that same draw), one pre-training and the label draws of
seed k. An interval over seeds therefore covers distillation-to-distillation variance.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ssdd import artifacts, determinism, distributed, folder_lock, precision, report
from ssdd.checkpoint import Checkpointer
from ssdd.config import Config, EvaluateConfig, fingerprint, to_dict
from ssdd.data import ImageSet, Normalizer, load_dataset, load_source, save_dataset
from ssdd.data.bundled import BUNDLED
from ssdd.data.formats import read_source
from ssdd.data.sources import load_target, target_name
from ssdd.distill import registry
from ssdd.distill.registry import DistillContext, DistilledSet, Hooks, SourceLabels, random_index
from ssdd.errors import Stopped, UserError
from ssdd.evaluate import Target, evaluate_encoder
from ssdd.evaluate.finetune import accuracy, finetune
from ssdd.evaluate.kd import kd_accuracy
from ssdd.interrupt import StopRequest
from ssdd.models import Encoder, auto_precision, build, encoder_from_artifact, model_spec
from ssdd.models import names as model_names
from ssdd.pretrain import pretrain_encoder, pretrain_ssl
from ssdd.teacher import as_teacher, is_torchscript, load_teacher, load_teacher_module, train_barlow_twins

log = logging.getLogger("ssdd")

STAGES = ("prepare", "teacher", "distill", "pretrain", "evaluate", "report")
MAIN_ONLY = ("prepare", "report")  # under torchrun: rank 0 does these, the other ranks wait
# The source's keys: targets never reach the teacher or distillation.
SOURCE_KEYS = ("seed", "data.source", "data.source_max_per_class", "data.size", "data.heldout")
DISTILL_COMMON = ("distill.m", "distill.batch", "distill.image_space", "distill.flip", "distill.crop_pad",
                  "distill.target_views")
PRETRAIN_KEYS = ("pretrain.epochs", "pretrain.batch", "pretrain.lr", "pretrain.momentum", "pretrain.weight_decay")
TARGET_KEYS = ("data.size", "data.target_max_per_class", "evaluate.test_split")
EVALUATE_KEYS = tuple(f"evaluate.{f.name}" for f in dataclasses.fields(EvaluateConfig) if f.name != "seeds")
# The config sections each stage depends on (its own and those upstream).
SECTIONS = {
    "prepare": ("seed", "data", "evaluate.test_split"),
    "teacher": SOURCE_KEYS + ("teacher",),
    "distill": SOURCE_KEYS + ("teacher", "model", "distill", "methods", "evaluate.seeds"),
    "pretrain": SOURCE_KEYS + ("teacher", "model", "distill", "methods", "evaluate.seeds", "pretrain"),
    "evaluate": ("seed", "data", "teacher", "model", "distill", "methods", "pretrain", "evaluate"),
    "report": ("seed", "data", "teacher", "model", "distill", "methods", "pretrain", "evaluate"),
}
INTERVAL_NOTE = ("Seed k is a whole replicate: the distillation's initial random draw (shared with that seed's "
                 "random_subset), the distillation's own randomness, the pre-training initialisation and the label "
                 "draws. The 95 % interval is a paired t-interval over seeds, so it covers distillation-to-distillation "
                 "variance; full_ssl is one encoder (the teacher), its seeds vary the evaluation only; the KD "
                 "experts are trained once per run and shared by every seed, so high_loss is the same set in every "
                 "seed and MKDT starts from it every time (their intervals cover their own randomness, pre-training "
                 "and label draws, not a different start).")


def run_networks(cfg: Config) -> dict[str, dict[str, Any]]:
    """Build specs of the run's teacher and student, labelled, for ``auto``'s timing. Channels come from
    the source spec without reading data: the bundled sets are grayscale, everything else is taken as RGB
    (CIFAR, ImageNet, image folders); a brought teacher (``teacher.path``) is timed as ``teacher.model``,
    the architecture it loads as."""
    channels = 1 if cfg.data.source in BUNDLED else 3
    return auto_precision.labelled(model_spec(cfg.teacher.model, channels, cfg.data.size, 0),
                                   model_spec(cfg.model, channels, cfg.data.size, 0))


def run_precision(cfg: Config, device: torch.device | str) -> str:
    """``fp32`` or ``bf16`` for this run: ``cfg.precision``, with ``auto`` measured on the run's own networks."""
    return auto_precision.resolve(cfg.precision, device, run_networks(cfg) if cfg.precision == "auto" else None)


def resolve_device(name: str = "auto") -> torch.device:
    """``--device``: auto (the GPU when there is one), cpu, cuda or cuda:N, checked against what is here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: not supported (expected auto, cpu, cuda or cuda:N)")
    return device


def single_process(command: str) -> None:
    """Standalone commands run in one process: under torchrun every rank would write the same files."""
    if distributed.launched():
        raise UserError(f"{command} runs in one process; start it without torchrun (ssdd run and ssdd compare "
                        "use several)")


def _suffix(k: int) -> str:
    return f".seed{k}" if k else ""


def encoder_path(out: Path, method: str, k: int, arch: str | None = None) -> Path:
    """``encoders/<method>.safetensors`` for the first seed, ``<method>.seed<k>.safetensors`` after;
    ``<method>@<arch>...`` for the extra architectures of architecture transfer."""
    return out / "encoders" / f"{method}{'@' + arch if arch else ''}{_suffix(k)}.safetensors"


def distilled_path(out: Path, method: str, k: int) -> Path:
    """``distilled/<method>.safetensors`` for the first seed, ``<method>.seed<k>.safetensors`` after."""
    return out / "distilled" / f"{method}{_suffix(k)}.safetensors"


def unique_target_names(specs: list[str]) -> dict[str, str]:
    """Short names for targets; two specs with the same file stem get a hash suffix each."""
    stems = [target_name(s) for s in specs]
    return {s: (n if stems.count(n) == 1 else f"{n}-{fingerprint({'spec': s})[:6]}") for s, n in zip(specs, stems)}


@dataclasses.dataclass
class EvalUnit:
    """One (encoder, target) evaluation: its place in results.json, what it evaluates, where it goes."""

    order: int
    method: registry.Method
    k: int
    enc_k: int
    arch: str | None
    group: str
    target: Target
    path: Path
    fp: str


class Run:
    """One pipeline run in one output folder."""

    def __init__(self, cfg: Config, out: str | Path, device: str = "auto", progress: bool = True):
        device = distributed.setup(device)  # under torchrun: join the group, this rank's GPU
        self.cfg, self.out, self.device = cfg, Path(out), resolve_device(device)
        determinism.configure(cfg.deterministic, self.device)
        self.progress = progress and distributed.is_main()
        self.precision = run_precision(cfg, self.device)
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out}: exists and is a file, expected a folder")
        self.data_dir = self.out / "data"
        if cfg.teacher.path and not Path(cfg.teacher.path).is_file():
            raise UserError(f"--teacher {cfg.teacher.path}: file not found")
        unknown = [a for a in cfg.pretrain.archs if a not in model_names()]
        if unknown:
            raise UserError(f"config: pretrain.archs: unknown architecture(s) {unknown} (available: {', '.join(model_names())})")
        self.methods = [registry.get(name) for name in cfg.methods]  # unknown names fail here, before any work
        if len(set(cfg.methods)) != len(cfg.methods):
            raise UserError(f"config: methods lists a method twice: {cfg.methods}")
        self.target_names = unique_target_names(cfg.data.targets)
        self.stop: Callable[[], bool] = lambda: False

    # ---- bookkeeping ------------------------------------------------------------------
    def _fp(self, keys: tuple[str, ...], **extra: Any) -> str:
        full, picked = to_dict(self.cfg), dict(extra)
        if keys != SECTIONS["prepare"] and self.precision != "fp32":  # bf16 runs make other artifacts; fp32
            picked["precision"] = self.precision  # fingerprints stay those of runs made before precision existed
        for key in keys:
            value = full
            for part in key.split("."):
                value = value[part]
            picked[key] = value
        return fingerprint(picked)

    def _section_fingerprint(self, stage: str) -> str:
        if stage == "prepare":  # folders prepared before source labels were kept apart are prepared again
            return self._fp(SECTIONS[stage], source_labels="kept")  # (same files; later stages stay fresh)
        return self._fp(SECTIONS[stage])

    def seeds(self) -> range:
        return range(self.cfg.evaluate.seeds)

    def set_methods(self) -> list[registry.Method]:
        return [m for m in self.methods if m.kind == "set"]

    def method_fp(self, method: registry.Method, k: int) -> str:
        keys = SOURCE_KEYS + ("teacher", "model") + DISTILL_COMMON + method.needs
        keys += tuple(n for p in method.prep for n in registry.get_prep(p).needs)
        return self._fp(keys, method=method.name, k=k)

    def active_preps(self, method: registry.Method) -> list[str]:
        """The method's preparatory stages that this config switches on (optional ones may be off)."""
        return [p for p in method.prep if registry.get_prep(p).enabled(self.cfg.distill)]

    def prep_fp(self, name: str) -> str:
        return self._fp(SOURCE_KEYS + ("teacher", "model") + DISTILL_COMMON + registry.get_prep(name).needs, prep=name)

    def encoder_fp(self, method: registry.Method, k: int, arch: str | None) -> str:
        if method.name == "full_ssl":
            return self._fp(SOURCE_KEYS + ("teacher",), method="full_ssl")
        if method.name == "no_pretrain":
            return self._fp(("seed", "model"), method="no_pretrain", k=k, arch=arch)
        return self._fp(PRETRAIN_KEYS, set=self.method_fp(method, k), arch=arch)

    def encoder_seeds(self, method: registry.Method) -> range:
        return range(1) if method.name == "full_ssl" else self.seeds()

    def outputs(self, stage: str) -> list[Path]:
        o = self.out
        return {
            "prepare": [self.data_dir / "source_train.safetensors", self.data_dir / "source_heldout.safetensors"]
            + [p for t in self.cfg.data.targets for p in self.target_paths(t)],
            "teacher": [self.teacher_file()],
            "distill": [distilled_path(o, m.name, k) for m in self.set_methods() for k in self.seeds()],
            "pretrain": [encoder_path(o, m.name, k, a) for m in self.methods for a in self.archs(m)
                         for k in self.encoder_seeds(m) if not (m.name == "full_ssl" and not self.teacher_is_encoder())]
            + [o / "pretrain_log.json"],
            "evaluate": [o / "results.json", o / "results.csv"],
            "report": [o / "report.md"],
        }[stage]

    def archs(self, method: registry.Method | None = None) -> list[str | None]:
        """None (the configured student, ``model.arch``) and the extra architectures to transfer to."""
        if method is not None and method.name == "full_ssl":
            return [None]
        return [None, *self.cfg.pretrain.archs]

    def checkpointer(self, name: str, fp: str | None = None) -> Checkpointer:
        return Checkpointer(self.out, name, fp or self._section_fingerprint(name), self.cfg.checkpoint_every,
                            self.cfg.checkpoint_minutes, self.device.type)

    def _resumable(self, name: str, fp: str, loop: Callable[[Hooks], Any]) -> Any:
        """Run a step loop with checkpoint hooks (resume, periodic saves, stop on a signal); clear
        its checkpoints once the caller has saved the result."""
        ckpt = self.checkpointer(name, fp)
        with StopRequest() as stop:
            try:
                result = loop(Hooks(ckpt.load(), ckpt.save, ckpt.due, stop))
            except Stopped as err:
                raise Stopped(name, err.step, str(self.out)) from None
        return ckpt, result

    def teacher_is_encoder(self) -> bool:
        return not (self.cfg.teacher.path and is_torchscript(Path(self.cfg.teacher.path)))

    def teacher_file(self) -> Path:
        """``teacher.safetensors`` (an ssdd encoder), or ``teacher.torchscript.pt`` for a TorchScript teacher."""
        return self.out / ("teacher.safetensors" if self.teacher_is_encoder() else "teacher.torchscript.pt")

    def target_paths(self, target: str) -> tuple[Path, Path]:
        name = self.target_names[target]
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
        with folder_lock.hold(self.out):
            self._run_stages(stages)

    def _run_stages(self, stages: list[str]) -> None:
        if distributed.is_main():
            for stale in self.out.rglob(".*.tmp") if self.out.is_dir() else []:
                stale.unlink(missing_ok=True)  # a temp file left by a killed write is never an artifact
        if distributed.active():
            log.info("distributed: %d ranks (%s), this is rank 0 on %s", distributed.world(),
                     torch.distributed.get_backend(), self.device)
        log.info("precision %s (config: %s) on %s", self.precision, self.cfg.precision, precision.describe(self.device))
        for stage in stages:
            if stage != "prepare":
                self.preflight()
            distributed.barrier()  # what rank 0 wrote so far is there for every rank
            if distributed.broadcast(self.is_done(stage)):
                log.info("%-8s skipped: artifacts exist for this config", stage)
                continue
            start = time.perf_counter()
            existed = {p for p in self.outputs(stage) if p.exists()}
            try:
                with StopRequest() as stop, precision.use(self.precision):
                    self.stop = stop
                    if stage not in MAIN_ONLY or distributed.is_main():
                        getattr(self, f"stage_{stage}")()
            except BaseException:
                if stage == "prepare" and distributed.is_main():  # never half prepared; later stages keep units
                    for path in self.outputs(stage):
                        if path not in existed:
                            try:
                                path.unlink(missing_ok=True)
                            except OSError:
                                pass
                raise
            self.mark_done(stage)
            log.info("%-8s done in %.1f s", stage, time.perf_counter() - start)

    def preflight(self) -> None:
        """What can be checked before hours of work: the budget m against the prepared source."""
        path = self.data_dir / "source_train.safetensors"
        if path.is_file():
            n = int(artifacts.read_meta(path).get("count", 0)) or len(load_dataset(path))
            if self.cfg.distill.m > n and self.set_methods():
                raise UserError(f"config: distill.m={self.cfg.distill.m} is larger than the source ({n} images)")

    def _check_stop(self, stage: str, done: int) -> None:
        if distributed.any_true(self.stop()):  # every rank reaches this at the same point
            raise Stopped(stage, done, str(self.out))

    def _fresh(self, path: Path, fp: str) -> bool:
        """An artifact exists and was made for this fingerprint (then it is reused, not redone): rank 0's
        answer on every rank, so that all ranks skip or do the same units."""
        return distributed.broadcast(self._fresh_here(path, fp) if distributed.is_main() else None)

    def _fresh_here(self, path: Path, fp: str) -> bool:
        if not path.is_file():
            return False
        try:
            meta = artifacts.read_json(path) if path.suffix == ".json" else artifacts.read_meta(path)
        except UserError:
            return False
        return meta.get("fingerprint") == fp

    # ---- stages -----------------------------------------------------------------------
    def stage_prepare(self) -> None:
        data = self.cfg.data
        source = load_source(data.source, data.size, "train", data.source_max_per_class or None)
        if data.heldout >= len(source):
            raise UserError(f"config: data.heldout={data.heldout} leaves no source images ({len(source)} in all)")
        order = torch.randperm(len(source), generator=torch.Generator().manual_seed(self.cfg.seed))
        unlabeled = ImageSet(source.images, None, [], source.name)  # the source's labels are never read
        if self.set_methods() and self.cfg.distill.m > len(source) - data.heldout:
            raise UserError(f"config: distill.m={self.cfg.distill.m} is larger than the source "
                            f"({len(source) - data.heldout} images after data.heldout={data.heldout})")
        save_dataset(self.data_dir / "source_train.safetensors", unlabeled.subset(order[data.heldout:]))
        save_dataset(self.data_dir / "source_heldout.safetensors", unlabeled.subset(order[:data.heldout]))
        for target in data.targets:
            train, test = load_target(target, data.size, self.cfg.evaluate.test_split, data.target_max_per_class or None)
            train_path, test_path = self.target_paths(target)
            save_dataset(train_path, train)
            save_dataset(test_path, test)
        labels_path = self.data_dir / "source_labels.safetensors"
        if source.labels is not None:  # kept apart: only labelled baselines (dsa, dm, ...) read them
            artifacts.save_tensors(labels_path, {"labels": source.labels[order[data.heldout:]].long()},
                                   {"class_names": list(source.class_names), "num_classes": source.num_classes})
        elif labels_path.is_file():
            labels_path.unlink()

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
        if self.cfg.teacher.path:  # bring your own: checked, then stored in our format where possible
            spec = model_spec(self.cfg.teacher.model, data.shape[0], data.shape[1], out_dim=0)
            module, module_spec = load_teacher_module(self.cfg.teacher.path, spec)
            as_teacher(module, data.shape[0], data.shape[1], f"--teacher {self.cfg.teacher.path}")
            if module_spec is not None:
                artifacts.save_encoder(self.teacher_file(), module, module_spec,
                                       {"method": "external", "path": str(self.cfg.teacher.path)})
            else:
                artifacts.write_bytes(self.teacher_file(), Path(self.cfg.teacher.path).read_bytes())
            return
        if self.cfg.teacher.extra_sources:
            extra = [load_source(spec, self.cfg.data.size, "train").images for spec in self.cfg.teacher.extra_sources]
            data = ImageSet(torch.cat([data.images, *extra]), None, [], "teacher_images")
            log.info("teacher  trains on %d unlabeled images (source + teacher.extra_sources)", len(data))
        ckpt, result = self._resumable("teacher", self._section_fingerprint("teacher"), lambda hooks: train_barlow_twins(
            data, norm, self.cfg.teacher, self.cfg.seed, self.device, self.progress, hooks.resume, hooks.checkpoint,
            hooks.checkpoint_due, hooks.should_stop, data_parallel=True))
        artifacts.save_encoder(self.out / "teacher.safetensors", result.encoder, result.spec,
                               {"method": "barlow_twins", "source": self.cfg.data.source, "seed": self.cfg.seed,
                                "extra_sources": self.cfg.teacher.extra_sources, "images_seen": len(data),
                                "loss_curve": result.losses})
        ckpt.clear()

    def _teacher(self, channels: int, size: int) -> tuple[torch.nn.Module, int]:
        path = self.teacher_file()
        if not path.is_file():
            raise UserError(f"{path}: not found; run `ssdd teacher` into this --out folder first")
        if self.teacher_is_encoder():
            teacher, dim, _ = load_teacher(path, channels, size, self.device)
            return teacher, dim
        return as_teacher(torch.jit.load(str(path), map_location=self.device), channels, size, str(path), self.device)

    def distill_context(self, source: ImageSet, heldout: ImageSet, cache: dict) -> DistillContext:
        """The context of the first seed; :meth:`for_seed` derives the others."""
        c, h, _ = source.shape
        teacher, dim = self._teacher(c, h)
        spec = model_spec(self.cfg.model, c, h, out_dim=dim)
        labels_path = self.data_dir / "source_labels.safetensors"
        labels = None
        if labels_path.is_file():
            tensors, meta = artifacts.load_tensors(labels_path)
            labels = SourceLabels(tensors["labels"], int(meta["num_classes"]), list(meta.get("class_names", [])))
        return DistillContext(source, heldout, teacher.eval(), self._source_norm(source), spec, self.cfg.distill,
                              self.cfg.seed, random_index(len(source), self.cfg.distill.m, self.cfg.seed), self.device,
                              self.progress, cache=cache, labels=labels)

    def for_seed(self, ctx: DistillContext, k: int) -> DistillContext:
        seed = self.cfg.seed + k
        return dataclasses.replace(ctx, seed=seed, init_index=random_index(len(ctx.source), self.cfg.distill.m, seed),
                                   heldout=ctx.heldout if k == 0 else None)  # the held-out check: first seed only

    def stage_distill(self) -> None:
        source, heldout = self._source("train"), self._source("heldout")
        base = self.distill_context(source, heldout, cache={})
        for method in self.set_methods():  # what can be refused (MKDT's memory) is, before any method's work
            stale = any(not self._fresh(distilled_path(self.out, method.name, k), self.method_fp(method, k))
                        for k in self.seeds())
            if method.preflight is not None and stale:
                method.preflight(base)
        for method in self.set_methods():
            prep = {name: self._prep(name, base) for name in self.active_preps(method)}
            for k in self.seeds():
                path, fp = distilled_path(self.out, method.name, k), self.method_fp(method, k)
                if self._fresh(path, fp):
                    log.info("distill  %s seed %d: exists", method.name, k)
                    continue
                self._check_stop("distill", k)
                ctx = dataclasses.replace(self.for_seed(base, k), prep=prep)
                start = time.perf_counter()
                ckpt, result = self._resumable(f"distill-{method.name}{_suffix(k)}", fp,
                                               lambda hooks: method.run(dataclasses.replace(ctx, hooks=hooks)))
                self._save_set(path, method.name, k, fp, result, ctx, time.perf_counter() - start)
                ckpt.clear()

    def _prep(self, name: str, base: DistillContext) -> dict[str, torch.Tensor]:
        """A preparatory stage's artifact (``distilled/prep/<name>.safetensors``), made once and reused."""
        path, fp = self.out / "distilled" / "prep" / f"{name}.safetensors", self.prep_fp(name)
        if self._fresh(path, fp):
            return artifacts.load_tensors(path)[0]
        start = time.perf_counter()
        ckpt, tensors = self._resumable(f"prep-{name}", fp, lambda hooks: registry.get_prep(name).run(
            dataclasses.replace(base, hooks=hooks)))
        artifacts.save_tensors(path, tensors, {"kind": "prep", "name": name, "fingerprint": fp})
        self.record_time(f"prep/{name}", time.perf_counter() - start)
        ckpt.clear()
        return tensors

    def _save_set(self, path: Path, name: str, k: int, fp: str, result: DistilledSet, ctx: DistillContext,
                  wall: float) -> None:
        targets = result.targets if result.targets is not None else torch.zeros(len(result.images), 0)
        if not (torch.isfinite(result.images).all() and torch.isfinite(targets).all()):
            raise UserError(f"distill: {name} (seed {k}) ended with NaN/inf in its set; lower its learning rates "
                            f"in distill.{name} (nothing was written)")
        cfg, norm = self.cfg, ctx.norm
        space_note = ("normalised: (pixel/255 - mean) / std" if cfg.distill.image_space == "normalized"
                      else "reference: raw pixel/255 in [0,1], not normalised (as the reference code)")
        meta = {"method": name, "seed": ctx.seed, "k": k, "fingerprint": fp, "objective": result.objective,
                "lr": result.lr, "source": cfg.data.source, "teacher": cfg.teacher.path or self.teacher_file().name,
                "image_space": cfg.distill.image_space, "image_space_note": space_note,
                "mean": norm.mean.flatten().tolist(), "std": norm.std.flatten().tolist(), "model_spec": ctx.spec,
                **result.meta}
        artifacts.save_distilled(path, result.images, targets, meta)
        self.record_time(f"distill/{name}/seed{k}", wall)

    def record_time(self, key: str, seconds: float) -> None:
        """Wall times live in ``timings.json``, not in artifacts, so that artifacts stay byte-reproducible."""
        path = self.out / "timings.json"
        times = artifacts.read_json(path) if path.is_file() else {}
        times[key] = round(seconds, 1)
        artifacts.write_json(path, times)

    # ---- pretrain ---------------------------------------------------------------------
    def stage_pretrain(self) -> None:
        units, keys = [], []
        for method in self.methods:
            for arch in self.archs(method):
                for k in self.encoder_seeds(method):
                    if method.name == "full_ssl" and not self.teacher_is_encoder():
                        continue  # a TorchScript teacher is evaluated from its own file
                    path, fp = encoder_path(self.out, method.name, k, arch), self.encoder_fp(method, k, arch)
                    keys.append((f"{method.name}{'@' + arch if arch else ''}/seed{k}", path))
                    if not self._fresh(path, fp):
                        units.append((method, k, arch, path, fp))
        self.in_rounds("pretrain", units, lambda unit: self._make_encoder(*unit[:3]),
                       lambda unit, made: artifacts.save_encoder(unit[3], made[0], made[1],
                                                                 {**made[2], "fingerprint": unit[4]}))
        if distributed.is_main():
            curves = {key: artifacts.read_meta(path).get("loss_curve") for key, path in keys}
            artifacts.write_json(self.out / "pretrain_log.json", {"epoch_loss": {k: c for k, c in curves.items() if c}})

    def in_rounds(self, stage: str, units: list, work: Callable[[Any], Any], keep: Callable[[Any, Any], None]) -> None:
        """Independent units (encoders, evaluations) spread over the ranks, one round of N at a time:
        rank r does unit ``i N + r`` of round i, rank 0 receives the round's results and keeps
        (writes) them, so every finished unit survives a stop. One process: one unit per round."""
        n = distributed.world()
        for start in range(0, len(units), n):
            self._check_stop(stage, start)
            mine = start + distributed.rank()
            result = work(units[mine]) if mine < len(units) else None
            for i, made in distributed.gather((mine, result)) or []:
                if i < len(units):
                    keep(units[i], made)

    def _make_encoder(self, method: registry.Method, k: int, arch: str | None) -> tuple[torch.nn.Module, dict, dict]:
        """(encoder on the CPU, its spec, its metadata) of one unit; the caller saves it."""
        cfg = self.cfg
        meta = {"method": method.name, "seed": cfg.seed + k}
        if method.name == "full_ssl":  # the teacher itself: the ceiling
            encoder, emeta = encoder_from_artifact(self.teacher_file(), "cpu")
            return encoder, emeta["model_spec"], meta
        if method.name == "no_pretrain":
            c, h, _ = self._source_shape()
            spec = {**(model_spec(cfg.model, c, h, 0) if arch is None else arch_spec(arch, c, h)), "out_dim": 0}
            torch.manual_seed(cfg.seed + k)
            return build(spec), spec, meta
        set_path = distilled_path(self.out, method.name, k)
        if not set_path.is_file():
            raise UserError(f"{set_path}: not found; run `ssdd distill` into this --out folder first")
        encoder, curve, spec = pretrain_set(cfg, set_path, cfg.seed + k, self.device, self.progress, arch)
        return encoder.cpu(), spec, {**meta, "distilled_set": set_path.name, "loss_curve": curve}

    def _source_shape(self) -> tuple[int, int, int]:
        shapes = artifacts.tensor_shapes(self.data_dir / "source_train.safetensors")
        return tuple(shapes["images"][1:])  # type: ignore[return-value]

    # ---- evaluate ---------------------------------------------------------------------
    def _targets(self) -> list[tuple[str, Target]]:
        out = []
        for spec in self.cfg.data.targets:
            train_path, test_path = self.target_paths(spec)
            out.append((spec, Target(self.target_names[spec], load_dataset(train_path), load_dataset(test_path))))
        return out

    def _encoder(self, method: registry.Method, k: int, arch: str | None) -> torch.nn.Module:
        if method.name == "full_ssl" and not self.teacher_is_encoder():
            c, h, _ = self._source_shape()
            teacher, dim = self._teacher(c, h)
            return Encoder(teacher, dim, 0).eval()
        path = encoder_path(self.out, method.name, k, arch)
        if not path.is_file():
            raise UserError(f"{path}: encoder missing for method {method.name} seed {k}; run `ssdd pretrain` "
                            "into this --out folder first")
        return encoder_from_artifact(path, self.device)[0]

    def stage_evaluate(self) -> None:
        cfg = self.cfg
        targets = self._targets()
        units, done = [], {}
        for arch in [None, *cfg.pretrain.archs]:
            group = arch or cfg.model.arch  # the table compares methods within a group
            for method in self.methods:
                if arch not in self.archs(method):
                    continue
                for k in self.seeds():
                    enc_k = 0 if method.name == "full_ssl" else k
                    for spec, target in targets:
                        path = self.out / "evaluations" / group / f"{method.name}{_suffix(k)}.{target.name}.json"
                        fp = self._fp(EVALUATE_KEYS + TARGET_KEYS, encoder=self.encoder_fp(method, enc_k, arch),
                                      target=spec, k=k, arch=arch)
                        unit = EvalUnit(len(units) + len(done), method, k, enc_k, arch, group, target, path, fp)
                        if self._fresh(path, fp):
                            done[unit.order] = artifacts.read_json(path)["rows"]
                        else:
                            units.append(unit)

        def keep(unit: EvalUnit, rows: list[dict]) -> None:
            artifacts.write_json(unit.path, {"fingerprint": unit.fp, "rows": rows})
            for fraction in cfg.evaluate.finetune_fractions:
                self._finetune_checkpointer(unit, fraction).clear()
            done[unit.order] = rows

        self.in_rounds("evaluate", units, self._evaluate_unit, keep)
        rows = [row for order in sorted(done) for row in done[order]]
        if "kd" in cfg.evaluate.protocols:
            rows += self._kd_rows([t for _, t in targets])
        write_results(self.out, rows)

    def _evaluate_unit(self, unit: EvalUnit) -> list[dict]:
        """One encoder on one target, every protocol; fine-tunes checkpoint mid-run (into this rank's own
        files under torchrun: units run on different ranks at once) and resume."""
        eval_cfg = self.cfg.evaluate if unit.arch is None else dataclasses.replace(self.cfg.evaluate,
                                                                                   protocols=["finetune"])
        encoder = self._encoder(unit.method, unit.enc_k, unit.arch)

        def hooks(fraction: float) -> Hooks:
            ckpt = self._finetune_checkpointer(unit, fraction)
            return Hooks(ckpt.load(), ckpt.save, ckpt.due, self.stop, agree=False)

        with artifacts.own_writes():
            rows = evaluate_encoder(unit.method.name, self.cfg.seed + unit.k, encoder, unit.target, eval_cfg,
                                    str(self.device), self.progress, finetune_hooks=hooks)
        return [{**row, "group": unit.group} for row in rows]

    def _finetune_checkpointer(self, unit: EvalUnit, fraction: float) -> Checkpointer:
        name = f"finetune-{unit.group}-{unit.path.stem}-{fraction:g}"
        return self.checkpointer(name, fingerprint({"unit": unit.fp, "fraction": fraction}))

    def _kd_rows(self, targets: list[Target]) -> list[dict]:
        """Protocol "kd": each pre-trained student learns the target from a supervised teacher using
        only its own distilled set's images; a randomly initialised student on Gaussian noise is the baseline."""
        cfg, dev = self.cfg, str(self.device)
        unit = self.out / "evaluations" / "kd.json"
        fp = self._fp(EVALUATE_KEYS + TARGET_KEYS + ("data.targets",),
                      encoders=[self.encoder_fp(m, k, None) for m in self.set_methods() for k in self.seeds()])
        if self._fresh(unit, fp):
            return artifacts.read_json(unit)["rows"]
        rows = []
        for target in targets:
            norm = Normalizer(*target.train.mean_std(), device=dev)
            c, h, _ = target.train.shape
            if cfg.evaluate.kd_teacher:
                teacher = encoder_from_artifact(cfg.evaluate.kd_teacher, dev)[0]
            else:
                torch.manual_seed(cfg.seed)
                teacher = finetune(build(model_spec(cfg.model, c, h, 0)), target.train, norm, cfg.evaluate, cfg.seed,
                                   dev, self.progress, desc=f"kd teacher {target.name}")
            row = {"target": target.name, "protocol": "kd", "label_fraction": 1.0, "arch": cfg.model.arch,
                   "group": cfg.model.arch}
            rows.append({**row, "method": "supervised_teacher", "seed": cfg.seed,
                         "accuracy": accuracy(teacher, target.test, norm, dev)})
            for k in self.seeds():
                students = []
                for method in self.set_methods():
                    images, _, meta = artifacts.load_distilled(distilled_path(self.out, method.name, k))
                    if images.shape[1:] != target.train.images.shape[1:]:
                        raise UserError(f"target {target.name}: kd needs distilled images shaped like the target's "
                                        f"{list(target.train.shape)}, got {list(images.shape[1:])}")
                    unit_images = images if meta.get("image_space") != "normalized" else \
                        Normalizer(meta["mean"], meta["std"]).to_unit(images)
                    students.append((method.name, norm.normalize_unit(unit_images.to(dev)),
                                     self._encoder(method, k, None)))
                if students:
                    noise = torch.randn(students[0][1].shape, generator=torch.Generator().manual_seed(cfg.seed + k))
                    torch.manual_seed(cfg.seed + k)
                    students.append(("gaussian_noise", noise.to(dev), build(model_spec(cfg.model, c, h, 0)).to(dev)))
                for name, images, student in students:
                    acc = kd_accuracy(student, teacher, images, target.test, norm, cfg.evaluate, cfg.seed + k, dev,
                                      self.progress, desc=f"kd {name} s{k}")
                    rows.append({**row, "method": name, "seed": cfg.seed + k, "accuracy": acc})
        artifacts.write_json(unit, {"fingerprint": fp, "rows": rows})
        return rows

    def stage_report(self) -> None:
        report.write_report(self.out, methods=list(self.cfg.methods), interval_note=INTERVAL_NOTE)


def write_results(out: Path, rows: list[dict]) -> None:
    artifacts.write_json(out / "results.json", rows)
    buf = io.StringIO()
    fields = list(dict.fromkeys(key for row in rows for key in row)) or ["method"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    artifacts.write_bytes(out / "results.csv", buf.getvalue().encode())


def run_pipeline(cfg: Config, out: str | Path, until: str | None = None, only: str | None = None,
                 device: str = "auto", progress: bool = True) -> Path:
    Run(cfg, out, device, progress).run(until=until, only=only)
    return Path(out)


# ---- stages on their own, from files ---------------------------------------------------

def prepare_file(source: str, fmt: str, size: int, out: str | Path, split: str = "train",
                 max_per_class: int | None = None) -> Path:
    """``ssdd prepare SOURCE --format FMT``: one raw dataset split -> one canonical dataset file."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give the dataset file to write (e.g. {out}/train.safetensors)")
    if size <= 0:
        raise UserError(f"--size must be positive, got {size}")
    data = read_source(source, fmt, size, split, max_per_class)
    save_dataset(out, data, {"source": str(source), "format": fmt, "split": split})
    log.info("prepared %d images %s (%d classes) -> %s", len(data), list(data.shape), data.num_classes, out)
    return out


def arch_spec(arch: str, channels: int, size: int) -> dict:
    """The build spec of a registered architecture (default options) for images of this shape."""
    return {"arch": arch, "in_channels": channels, "image_size": size, "out_dim": 0}


def pretrain_set(cfg: Config, distilled: str | Path, seed: int, device: torch.device, progress: bool = True,
                 arch: str | None = None) -> tuple[Encoder, list[float], dict]:
    """One encoder from one distilled set: MSE to its targets at its learned lr (or ``pretrain.lr``), or
    Barlow Twins on its images for a self-supervised set. Returns (encoder, loss curve, spec)."""
    images, targets, meta = artifacts.load_distilled(distilled)
    spec = meta.get("model_spec") or model_spec(cfg.model, images.shape[1], images.shape[2], targets.shape[1])
    if arch is not None:
        spec = arch_spec(arch, images.shape[1], images.shape[2])
    method = str(meta.get("method", Path(distilled).stem))
    name = f"pretrain {method}{'@' + arch if arch else ''} s{seed - cfg.seed}"
    if meta.get("objective", "mse") == "barlow_twins":
        c = images.shape[1]
        space = (Normalizer(meta["mean"], meta["std"], device) if meta.get("image_space") == "normalized"
                 else Normalizer([0.0] * c, [1.0] * c, device))
        encoder, curve = pretrain_ssl(images, space, spec, cfg.pretrain, cfg.teacher, seed, device, progress, desc=name)
        return encoder, curve, {**spec, "out_dim": 0}
    lr = meta.get("lr")
    encoder, curve = pretrain_encoder(images, targets, spec, cfg.pretrain, seed, device, progress, desc=name,
                                      lr=float(lr) if lr is not None else None,
                                      objective=str(meta.get("objective", "mse")))
    return encoder, curve, {**spec, "out_dim": targets.shape[1]}


def pretrain_file(cfg: Config, distilled: str | Path, out: str | Path, device: str = "auto",
                  progress: bool = True) -> Path:
    """``ssdd pretrain --distilled FILE``: encoders for each seed from one distilled set."""
    single_process("ssdd pretrain --distilled")
    out, dev, logs = Path(out), resolve_device(device), {}
    determinism.configure(cfg.deterministic, dev)
    method = str(artifacts.read_meta(distilled).get("method", Path(distilled).stem))
    for k in range(cfg.evaluate.seeds):
        with precision.use(run_precision(cfg, dev)):
            encoder, curve, spec = pretrain_set(cfg, distilled, cfg.seed + k, dev, progress)
        artifacts.save_encoder(encoder_path(out, method, k), encoder, spec,
                               {"method": method, "seed": cfg.seed + k, "distilled_set": Path(distilled).name,
                                "loss_curve": curve})
        logs[f"{method}/seed{k}"] = curve
    artifacts.write_json(out / "pretrain_log.json", {"epoch_loss": logs})
    return out


def evaluate_files(cfg: Config, encoders: list[str], targets: list[str], out: str | Path, device: str = "auto",
                   progress: bool = True) -> Path:
    """``ssdd evaluate --encoder E... --targets T...``: the transfer suite on artifacts, then the report."""
    single_process("ssdd evaluate --encoder")
    out, dev = Path(out), str(resolve_device(device))
    determinism.configure(cfg.deterministic, dev)
    names = unique_target_names(targets)
    loaded = [(t, *load_target(t, cfg.data.size, cfg.evaluate.test_split, cfg.data.target_max_per_class or None))
              for t in targets]
    suite = [Target(names[spec], train, test) for spec, train, test in loaded]
    rows, methods = [], []
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
                with precision.use(run_precision(cfg, dev)):
                    rows += evaluate_encoder(method, cfg.seed + k, encoder.to(dev), target, cfg.evaluate, dev, progress)
    write_results(out, rows)
    return report.write_report(out, methods=list(dict.fromkeys(methods)))


def diagnose_grad_variance(cfg: Config, out: str | Path, draws: int = 16, device: str = "auto",
                           progress: bool = True) -> Path:
    """``ssdd diagnose grad-variance``: prepare and teacher as needed, then the outer-gradient variance of
    naive bilevel SSL vs KRR-ST at the first seed's initial state (``grad_variance.json`` / ``.png``)."""
    from ssdd.distill.diagnose import write_grad_variance

    run = Run(cfg, out, device, progress)
    run.run(until="teacher")
    ctx = run.distill_context(run._source("train"), run._source("heldout"), cache={})
    with precision.use(run.precision):
        write_grad_variance(ctx, Path(out), draws)
    return Path(out)
