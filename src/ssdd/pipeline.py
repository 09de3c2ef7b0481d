"""`ssdd run`: the stages in order, each writing its artifacts into one output folder and
skipped when its artifacts exist for the same configuration.

Each stage saves the resolved config beside its artifacts (``config.<stage>.json``) with a
fingerprint of the config sections it and its upstream stages depend on.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ssdd import artifacts, report
from ssdd.config import Config, EvaluateConfig, fingerprint, to_dict
from ssdd.data import ImageSet, Normalizer, load_dataset, load_source, save_dataset
from ssdd.data.formats import read_source
from ssdd.data.sources import load_target, target_name
from ssdd.distill import distill_krr_st, heldout_batches, heldout_losses, initial_set
from ssdd.errors import Stopped, UserError
from ssdd.interrupt import StopRequest
from ssdd.evaluate import Target, evaluate_encoder
from ssdd.evaluate.finetune import accuracy, finetune
from ssdd.evaluate.kd import kd_accuracy
from ssdd.models import build, encoder_from_artifact, model_spec
from ssdd.models import names as model_names
from ssdd.pretrain import pretrain_encoder
from ssdd.teacher import as_teacher, is_torchscript, load_teacher, load_teacher_module, train_barlow_twins

log = logging.getLogger("ssdd")

STAGES = ("prepare", "teacher", "distill", "pretrain", "evaluate", "report")
# The config sections each stage depends on (its own and those upstream).
SECTIONS = {
    "prepare": ("seed", "data", "evaluate.test_split"),
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
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (expected auto, cpu, cuda or cuda:N)") from None


def encoder_path(out: Path, method: str, k: int, arch: str | None = None) -> Path:
    """``encoders/<method>.safetensors`` for the first seed, ``<method>.seed<k>.safetensors`` after;
    ``<method>@<arch>...`` for the extra architectures of architecture transfer."""
    name = method + (f"@{arch}" if arch else "") + (f".seed{k}" if k else "")
    return out / "encoders" / f"{name}.safetensors"


class Checkpointer:
    """Periodic checkpoints of one stage in its output folder (every N steps and every M minutes)."""

    def __init__(self, out: Path, stage: str, fingerprint: str, every: int, minutes: float):
        self.out, self.stage, self.fingerprint, self.every, self.minutes = out, stage, fingerprint, every, minutes
        self.last = time.monotonic()

    def load(self) -> dict | None:
        state = artifacts.load_checkpoint(self.out, self.stage, self.fingerprint)
        if state is not None:
            log.info("%-8s resuming from the checkpoint at step %d", self.stage, state["step"])
        return state

    def due(self, step: int) -> bool:
        if (self.every and step % self.every == 0) or time.monotonic() - self.last > 60 * self.minutes:
            self.last = time.monotonic()
            return True
        return False

    def save(self, state: dict) -> None:
        artifacts.save_checkpoint(self.out, self.stage, state, self.fingerprint)

    def clear(self) -> None:
        artifacts.clear_checkpoints(self.out, self.stage)


class UnitProgress:
    """Resumable progress over independent units of work (one encoder, one evaluation): each
    finished unit's result is checkpointed at once, so a rerun after a crash or a stop redoes at
    most the unit that was running."""

    def __init__(self, ckpt: Checkpointer, stop: Callable[[], bool]):
        self.ckpt, self.stop = ckpt, stop
        state = ckpt.load()
        self.done: dict[str, Any] = dict(state["units"]) if state else {}

    def run(self, key: str, work: Callable[[], Any], intact: Callable[[], bool] = lambda: True) -> Any:
        if key in self.done and intact():
            return self.done[key]
        if self.stop():
            raise Stopped(self.ckpt.stage, len(self.done), str(self.ckpt.out))
        self.done[key] = work()
        self.ckpt.save({"step": len(self.done), "units": self.done})
        return self.done[key]


class Run:
    """One pipeline run in one output folder."""

    def __init__(self, cfg: Config, out: str | Path, device: str = "auto", progress: bool = True):
        self.cfg, self.out, self.device, self.progress = cfg, Path(out), resolve_device(device), progress
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out}: exists and is a file, expected a folder")
        self.data_dir = self.out / "data"
        if cfg.teacher.path and not Path(cfg.teacher.path).is_file():
            raise UserError(f"--teacher {cfg.teacher.path}: file not found")
        unknown = [a for a in cfg.pretrain.archs if a not in model_names()]
        if unknown:
            raise UserError(f"config: pretrain.archs: unknown architecture(s) {unknown} (available: {', '.join(model_names())})")

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
            "teacher": [self.teacher_file()],
            "distill": [o / "distilled.safetensors", o / "random_subset.safetensors", o / "distill_log.json",
                        o / "distill_check.json"],
            "pretrain": [encoder_path(o, m, k, a) for m in METHODS[:3] for k in seeds for a in self.archs()]
            + [o / "pretrain_log.json"] + ([encoder_path(o, "full_ssl", 0)] if self.teacher_is_encoder() else []),
            "evaluate": [o / "results.json", o / "results.csv"],
            "report": [o / "report.md"],
        }[stage]

    def archs(self) -> list[str | None]:
        """None (the configured student, ``model.arch``) and the extra architectures to transfer to."""
        return [None, *self.cfg.pretrain.archs]

    def checkpointer(self, stage: str) -> "Checkpointer":
        return Checkpointer(self.out, stage, self._section_fingerprint(stage), self.cfg.checkpoint_every,
                            self.cfg.checkpoint_minutes)

    def _resumable(self, stage: str, loop: Callable[..., Any]) -> tuple[Checkpointer, Any]:
        """Run a step loop with this stage's checkpoint hooks (resume, periodic saves, stop on a signal)."""
        ckpt = self.checkpointer(stage)
        with StopRequest() as stop:
            try:
                return ckpt, loop(resume=ckpt.load(), checkpoint=ckpt.save, checkpoint_due=ckpt.due, should_stop=stop)
            except Stopped as err:
                raise Stopped(stage, err.step, str(self.out)) from None

    def teacher_is_encoder(self) -> bool:
        return not (self.cfg.teacher.path and is_torchscript(Path(self.cfg.teacher.path)))

    def teacher_file(self) -> Path:
        """``teacher.safetensors`` (an ssdd encoder), or ``teacher.torchscript.pt`` for a TorchScript teacher."""
        return self.out / ("teacher.safetensors" if self.teacher_is_encoder() else "teacher.torchscript.pt")

    def target_paths(self, target: str) -> tuple[Path, Path]:
        name = target_name(target)
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
        for stale in self.out.rglob(".*.tmp") if self.out.is_dir() else []:
            stale.unlink(missing_ok=True)  # a temp file left by a killed write is never an artifact
        for stage in stages:
            if self.is_done(stage):
                log.info("%-8s skipped: artifacts exist for this config", stage)
                continue
            start = time.perf_counter()
            existed = {p for p in self.outputs(stage) if p.exists()}
            try:
                getattr(self, f"stage_{stage}")()
            except BaseException:
                if artifacts.has_checkpoint(self.out, stage):
                    raise  # resumable: what was written is the progress the checkpoint describes
                # never leave a stage half done: remove what this attempt wrote
                for path in self.outputs(stage):
                    if path not in existed:
                        try:
                            path.unlink(missing_ok=True)
                        except OSError:
                            pass
                raise
            self.mark_done(stage)
            log.info("%-8s done in %.1f s", stage, time.perf_counter() - start)

    # ---- stages -----------------------------------------------------------------------
    def stage_prepare(self) -> None:
        data = self.cfg.data
        source = load_source(data.source, data.size, "train", data.source_max_per_class or None)
        if data.heldout >= len(source):
            raise UserError(f"config: data.heldout={data.heldout} leaves no source images ({len(source)} in all)")
        order = torch.randperm(len(source), generator=torch.Generator().manual_seed(self.cfg.seed))
        unlabeled = ImageSet(source.images, None, [], source.name)  # the source's labels are never read
        save_dataset(self.data_dir / "source_train.safetensors", unlabeled.subset(order[data.heldout:]))
        save_dataset(self.data_dir / "source_heldout.safetensors", unlabeled.subset(order[:data.heldout]))
        for target in data.targets:
            train, test = load_target(target, data.size, self.cfg.evaluate.test_split, data.target_max_per_class or None)
            train_path, test_path = self.target_paths(target)
            save_dataset(train_path, train)
            save_dataset(test_path, test)

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
        ckpt, result = self._resumable("teacher", lambda **hooks: train_barlow_twins(
            data, norm, self.cfg.teacher, self.cfg.seed, self.device, self.progress, **hooks))
        artifacts.save_encoder(self.out / "teacher.safetensors", result.encoder, result.spec,
                               {"method": "barlow_twins", "source": self.cfg.data.source, "seed": self.cfg.seed,
                                "loss_curve": result.losses})
        ckpt.clear()

    def _teacher(self, channels: int, size: int):
        path = self.teacher_file()
        if not path.is_file():
            raise UserError(f"{path}: not found; run `ssdd teacher` into this --out folder first")
        if self.teacher_is_encoder():
            return load_teacher(path, channels, size, self.device)
        teacher, dim = as_teacher(torch.jit.load(str(path), map_location=self.device), channels, size, str(path), self.device)
        return teacher, dim, {}

    def stage_distill(self) -> None:
        cfg = self.cfg
        source, heldout = self._source("train"), self._source("heldout")
        norm = self._source_norm(source)
        c, h, _ = source.shape
        teacher, dim, _ = self._teacher(c, h)
        spec = model_spec(cfg.model, c, h, out_dim=dim)
        ckpt, result = self._resumable("distill", lambda **hooks: distill_krr_st(
            source, teacher, norm, spec, cfg.distill, cfg.seed, self.device, self.progress, **hooks))
        if not (torch.isfinite(result.images).all() and torch.isfinite(result.targets).all()):
            raise UserError("distill: the synthetic set holds NaN/inf after the last step; lower distill.lr_images "
                            "(nothing was written)")
        meta = {"source": cfg.data.source, "teacher": cfg.teacher.path or self.teacher_file().name, "seed": cfg.seed,
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
        ckpt.clear()
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
        with StopRequest() as stop:
            units = UnitProgress(self.checkpointer("pretrain"), stop)
            for method in ("krr_st", "random_subset"):
                path = self.out / ("distilled.safetensors" if method == "krr_st" else "random_subset.safetensors")
                if not path.is_file():
                    raise UserError(f"{path}: not found; run `ssdd distill` into this --out folder first")
                for arch in self.archs():
                    logs.update(pretrain_seeds(cfg, path, self.out, self.device, self.progress, arch, units))
        images, _, meta = artifacts.load_distilled(path)
        for arch in self.archs():
            spec = {**(meta["model_spec"] if arch is None else arch_spec(arch, images)), "out_dim": 0}
            for k in range(cfg.evaluate.seeds):
                torch.manual_seed(cfg.seed + k)
                artifacts.save_encoder(encoder_path(self.out, "no_pretrain", k, arch), build(spec), spec,
                                       {"method": "no_pretrain", "seed": cfg.seed + k})
        if self.teacher_is_encoder():
            shutil.copyfile(self.teacher_file(), encoder_path(self.out, "full_ssl", 0))
        artifacts.write_json(self.out / "pretrain_log.json", {"epoch_loss": logs})
        units.ckpt.clear()

    def _targets(self) -> list[Target]:
        out = []
        for target in self.cfg.data.targets:
            train_path, test_path = self.target_paths(target)
            out.append(Target(target_name(target), load_dataset(train_path), load_dataset(test_path)))
        return out

    def stage_evaluate(self) -> None:
        targets = self._targets()
        with StopRequest() as stop:
            units = UnitProgress(self.checkpointer("evaluate"), stop)
            rows = evaluate_all(self.out, METHODS, self.cfg, targets, str(self.device), self.progress, units=units)
            if "kd" in self.cfg.evaluate.protocols:
                rows += units.run("kd", lambda: self._kd_rows(targets))
            finetune_only = dataclasses.replace(self.cfg.evaluate, protocols=["finetune"])  # the paper's transfer table
            for arch in self.cfg.pretrain.archs:
                rows += evaluate_all(self.out, METHODS[:3], self.cfg, targets, str(self.device), self.progress, arch,
                                     finetune_only, units)
        write_results(self.out, rows)
        units.ckpt.clear()

    def _kd_rows(self, targets: list[Target]) -> list[dict]:
        """Protocol "kd": each pre-trained student learns the target from a supervised teacher using
        only its own distilled set's images; a randomly initialised student on Gaussian noise is the baseline."""
        cfg, dev = self.cfg, str(self.device)
        sets = {m: artifacts.load_distilled(self.out / f) for m, f in
                (("krr_st", "distilled.safetensors"), ("random_subset", "random_subset.safetensors"))}
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
            transfer = {}
            for method, (images, _, meta) in sets.items():
                if images.shape[1:] != target.train.images.shape[1:]:
                    raise UserError(f"target {target.name}: kd needs distilled images shaped like the target's "
                                    f"{list(target.train.shape)}, got {list(images.shape[1:])}")
                unit = images if meta.get("image_space") != "normalized" else Normalizer(meta["mean"], meta["std"]).to_unit(images)
                transfer[method] = norm.normalize_unit(unit.to(dev))
            noise = torch.randn(transfer["krr_st"].shape, generator=torch.Generator().manual_seed(cfg.seed)).to(dev)
            for k in range(cfg.evaluate.seeds):
                for method, images, student_method in (("krr_st", transfer["krr_st"], "krr_st"),
                                                       ("random_subset", transfer["random_subset"], "random_subset"),
                                                       ("gaussian_noise", noise, "no_pretrain")):
                    student = encoder_from_artifact(encoder_path(self.out, student_method, k), dev)[0]
                    acc = kd_accuracy(student, teacher, images, target.test, norm, cfg.evaluate, cfg.seed + k, dev,
                                      self.progress, desc=f"kd {method} s{k}")
                    rows.append({**row, "method": method, "seed": cfg.seed + k, "accuracy": acc})
        return rows

    def stage_report(self) -> None:
        report.write_report(self.out)


def evaluate_all(out: Path, methods: tuple[str, ...], cfg: Config, targets: list[Target], device: str,
                 progress: bool, arch: str | None = None, eval_cfg: EvaluateConfig | None = None,
                 units: UnitProgress | None = None) -> list[dict]:
    """Each method's encoder for each seed (full_ssl: one encoder, seeds vary the evaluation only)."""
    rows = []
    group = arch or cfg.model.arch  # the table compares methods within a group; full_ssl's own arch is the teacher's
    for k in range(cfg.evaluate.seeds):
        for method in methods:
            path = encoder_path(out, method, k, arch)
            path = path if path.exists() else encoder_path(out, method, 0, arch)
            encoder, _ = encoder_from_artifact(path, device)
            for target in targets:
                def work(target: Target = target) -> list[dict]:
                    return [{**row, "group": group} for row in
                            evaluate_encoder(method, cfg.seed + k, encoder, target, eval_cfg or cfg.evaluate, device,
                                             progress)]
                key = f"{group}/{method}/seed{k}/{target.name}"
                rows += units.run(key, work) if units else work()
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


def arch_spec(arch: str, images: torch.Tensor) -> dict:
    """The build spec of a registered architecture (default options) for images like ``images``."""
    return {"arch": arch, "in_channels": images.shape[1], "image_size": images.shape[2], "out_dim": 0}


def pretrain_seeds(cfg: Config, distilled: str | Path, out: Path, device: torch.device,
                   progress: bool = True, arch: str | None = None,
                   units: UnitProgress | None = None) -> dict[str, list[float]]:
    """One encoder per evaluation seed from one distilled set (with the set's own student
    architecture, or ``arch``); returns the loss curves."""
    images, targets, meta = artifacts.load_distilled(distilled)
    spec = meta.get("model_spec") or model_spec(cfg.model, images.shape[1], images.shape[2], targets.shape[1])
    if arch is not None:
        spec = arch_spec(arch, images)
    method = str(meta.get("method", Path(distilled).stem))
    name = method + (f"@{arch}" if arch else "")
    logs = {}
    for k in range(cfg.evaluate.seeds):
        def work(k: int = k) -> list[float]:
            encoder, curve = pretrain_encoder(images, targets, spec, cfg.pretrain, cfg.seed + k, device, progress,
                                              desc=f"pretrain {name} s{k}")
            artifacts.save_encoder(encoder_path(out, method, k, arch), encoder, {**spec, "out_dim": targets.shape[1]},
                                   {"method": method, "seed": cfg.seed + k, "distilled_set": Path(distilled).name})
            return curve
        key = f"{name}/seed{k}"
        logs[key] = units.run(key, work, encoder_path(out, method, k, arch).is_file) if units else work()
    return logs


def pretrain_file(cfg: Config, distilled: str | Path, out: str | Path, device: str = "auto",
                  progress: bool = True) -> Path:
    """``ssdd pretrain --distilled FILE``: encoders for each seed from one distilled set."""
    out = Path(out)
    logs = pretrain_seeds(cfg, distilled, out, resolve_device(device), progress)
    artifacts.write_json(out / "pretrain_log.json", {"epoch_loss": logs})
    return out


def evaluate_files(cfg: Config, encoders: list[str], targets: list[str], out: str | Path, device: str = "auto",
                   progress: bool = True) -> Path:
    """``ssdd evaluate --encoder E... --targets T...``: the transfer suite on artifacts, then the report."""
    out, dev = Path(out), str(resolve_device(device))
    loaded = [(t, *load_target(t, cfg.data.size, cfg.evaluate.test_split, cfg.data.target_max_per_class or None))
              for t in targets]
    suite = [Target(target_name(spec), train, test) for spec, train, test in loaded]
    rows = []
    for path in encoders:
        for k in range(cfg.evaluate.seeds):
            if path == "none":
                torch.manual_seed(cfg.seed + k)
                c, h, _ = suite[0].train.shape
                encoder, method = build(model_spec(cfg.model, c, h, 0)), "no_pretrain"
            else:
                encoder, meta = encoder_from_artifact(path, dev)
                method = str(meta.get("method", Path(path).stem))
            for target in suite:
                rows += evaluate_encoder(method, cfg.seed + k, encoder.to(dev), target, cfg.evaluate, dev, progress)
    write_results(out, rows)
    return report.write_report(out)
