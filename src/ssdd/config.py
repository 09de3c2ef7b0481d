"""Typed configuration: defaults in dataclasses, presets as TOML files, typed overrides.

One source of truth for every default: the dataclasses below. A preset only lists what
differs; ``--set key=value`` overrides must match the default's type, and unknown keys are
rejected with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from ssdd.errors import UserError


@dataclass
class ModelConfig:
    """A network from the registry (see ``ssdd.models``)."""

    arch: str = "convnet"
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    pool: str = "gap"  # convnet: "gap" (global average) or "flatten" (the paper's ConvNet)
    norm: str = "batch"  # convnet: "batch" (KRR-ST's ConvNet) or "instance" (MKDT's; no running statistics)


@dataclass
class DataConfig:
    source: str = "mnist5k"  # spec: bundled name, prepared file, FORMAT:PATH (see ssdd.data.sources)
    source_max_per_class: int = 0  # 0 = all images
    size: int = 32
    heldout: int = 500  # source images never used to train teacher or distillation
    targets: list[str] = field(default_factory=lambda: ["digits"])
    target_max_per_class: int = 0  # cap on each target's labelled train images per class; 0 = all


@dataclass
class TeacherConfig:
    path: str = ""  # bring your own teacher (file); empty = train Barlow Twins here
    # more unlabeled images for the teacher only (source specs; labels never read): a stronger ceiling
    extra_sources: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 1000
    batch: int = 256
    optimizer: str = "sgd"  # "sgd" (momentum) or "adamw"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    projector: list[int] = field(default_factory=lambda: [2048, 2048])
    redundancy_weight: float = 5e-3  # Barlow Twins lambda
    min_crop_scale: float = 0.2
    hue: float = 0.1  # colour-jitter hue (RGB only); kornia's hue op dominates augmentation time on CPU


@dataclass
class KrrStConfig:
    """KRR-ST (DESIGN.md, "KRR-ST, exactly")."""

    steps: int = 160_000
    lr_images: float = 1e-4
    lr_targets: float = 1e-4
    final_lr_ratio: float = 1e-3
    ridge: float = 1e-6  # lambda = ridge * trace(K_ss)
    pool_size: int = 10
    pool_max_age: int = 1000
    pool_reset: str = "fixed"  # "fixed": age counter reset on re-init; "reference": never reset
    pool_lr: float = 0.1
    pool_momentum: float = 0.9
    pool_weight_decay: float = 1e-3
    check_batches: int = 4  # held-out real batches for the held-out loss check (first seed)
    check_models: int = 4
    # speed (none of these changes the maths beyond rounding, except where said)
    chunk: int = 2000  # synthetic images per pass; larger sets run chunk by chunk (same gradient; the
    #                    pool's SGD step then takes BatchNorm statistics per chunk): bounds memory at m = 10,000
    fold_bn: bool = True  # fold BatchNorm into the convolutions of eval-mode passes (teacher; the picked pool model)
    compile: str = "auto"  # torch.compile the teacher and the pool models' passes: "on", "off", "auto" = on from 1000
    #                        steps (compiling takes ~0.5-1 min on a CPU and saves ~15 % of a paper-size step)
    teacher_cache_views: int = 0  # >0: teacher features of this many fixed crop/flip views per source image, computed
    #                               once and sampled from then on. CHANGES THE SAMPLING (K views instead of fresh ones)


@dataclass
class ExpertsConfig:
    """Knowledge-distillation experts (MKDT stage 1): students regressing the teacher's features of
    the un-augmented source, parameters saved at init and after every epoch. (MTT's classifier experts
    use the same fields under ``distill.mtt.experts``.)"""

    count: int = 10
    epochs: int = 5  # only epochs 0 .. max_start_epoch + span are ever read
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch: int = 256
    augment: bool = False  # crop/flip views (targets from the teacher on the same view): augmentation-consistent experts


@dataclass
class MkdtConfig:
    """MKDT (../shared/methods/mkdt.md): trajectory matching to the KD experts."""

    iterations: int = 5000
    syn_steps: int = 40  # N: unrolled student steps on the synthetic set per iteration
    span: int = 2  # M: expert epochs the N steps should cover
    max_start_epoch: int = 2
    lr_images: float = 1e3
    lr_targets: float = 1.0
    lr_lr: float = 1e-4
    lr_init: float = 0.1  # the learnable inner (and pre-training) learning rate starts here
    momentum: float = 0.5
    batch_syn: int = 0  # synthetic minibatch per unrolled step; 0 = the whole set
    init: str = "high_loss"  # "high_loss" (MKDT), "random" (the paired random draw) or "krr_st"


def _mtt_experts() -> ExpertsConfig:
    # MTT's buffer.py: SGD lr 0.01, no momentum, no weight decay, batch 256, 100 experts (it trains 50
    # epochs; only 0 .. max_start_epoch + span = 22 are ever read). Its DSA augmentation and ZCA are off here.
    return ExpertsConfig(count=100, epochs=22, lr=0.01, momentum=0.0, weight_decay=0.0, batch=256)


@dataclass
class MttConfig:
    """MTT (Cazenavette et al. 2022): class-balanced real images with fixed one-hot labels whose unrolled
    cross-entropy training imitates classifier experts. Published values: ConvNet-3, 32 px, CIFAR-10, 10 per class.

    Its experts have their own table (``distill.mtt.experts``, the type of ``distill.experts``): MTT's recipe
    (optimiser, 22 epochs) differs from MKDT's, and a change to one must not redo the other's experts."""

    iterations: int = 5000
    syn_steps: int = 30  # N: unrolled student steps on the synthetic set per iteration
    span: int = 2  # M: expert epochs the N steps should cover (MTT's expert_epochs)
    max_start_epoch: int = 20
    lr_images: float = 1e3  # MTT's lr_img
    lr_lr: float = 1e-5
    lr_init: float = 0.01  # MTT's lr_teacher: the learnable inner (and pre-training) learning rate starts here
    momentum: float = 0.5
    batch_syn: int = 0  # synthetic minibatch per unrolled step; 0 = the whole set (MTT's default)
    experts: ExpertsConfig = field(default_factory=_mtt_experts)


@dataclass
class NaiveBilevelConfig:
    """Naive bilevel SSL: unrolled Barlow Twins steps on augmented synthetic images."""

    steps: int = 200
    inner_steps: int = 3
    inner_lr: float = 0.1
    lr_images: float = 1e-2
    redundancy_weight: float = 5e-3
    projector: list[int] = field(default_factory=lambda: [256, 256])


@dataclass
class KmeansConfig:
    """MiniBatchKMeans on teacher features; the real image nearest each centroid."""

    batch_size: int = 1024
    n_init: int = 3
    max_iter: int = 100


@dataclass
class KipConfig:
    """KIP (Nguyen et al., ICLR 2021), labelled: images whose kernel ridge regression predicts real labels;
    here with a random-feature (NNGP-style) kernel of the ``model`` ConvNet (see ``ssdd.distill.kip``)."""

    steps: int = 1000  # the KIP authors' colab: ~1000 steps or more for convergence
    lr_images: float = 0.01  # Adam (KIP, ICLR 2021)
    lr_labels: float = 0.01  # Adam, only with learn_labels
    ridge: float = 1e-6  # lambda = ridge * trace(K_ss) / m (KIP)
    models: int = 4  # freshly initialised ConvNets per step whose features make the kernel (ours; not in KIP)
    learn_labels: bool = False  # KIP's optional label learning; the set is then stored for MSE pre-training


@dataclass
class FrepoConfig:
    """FRePo (Zhou et al., NeurIPS 2022) with fixed one-hot labels, run on the KRR-ST engine (see
    ``ssdd.distill.frepo``); the engine's speed options (chunk, fold_bn, compile) come from distill.krr_st."""

    steps: int = 500_000
    lr_images: float = 3e-4  # FRePo: LAMB at 3e-4; the engine's AdamW here
    final_lr_ratio: float = 0.1  # FRePo decays by cosine to 0.1x; the engine decays linearly
    ridge: float = 1e-6  # lambda = ridge * trace(K_ss) / m (FRePo)
    pool_size: int = 10
    pool_max_age: int = 100  # online updates before a pool model is re-initialised (FRePo)
    pool_lr: float = 0.1  # the engine's SGD pool step (FRePo trains its pool with Adam at 3e-4)
    pool_momentum: float = 0.9
    pool_weight_decay: float = 1e-3


@dataclass
class DmConfig:
    """DM (Zhao & Bilen, WACV 2023), labelled: per class, the mean embedding of the synthetic images matches
    the real images' under a freshly initialised network each iteration. Published values (32 px, ConvNet-3)."""

    iterations: int = 20_000
    lr_images: float = 1.0  # SGD on the images
    momentum: float = 0.5
    batch_real: int = 256  # real images per class per iteration (all of a smaller class)
    augment: str = "color_crop_cutout_flip_scale_rotate"  # DSA operations (one per class and iteration); "none"


@dataclass
class DsaConfig:
    """DSA (Zhao & Bilen, ICML 2021), labelled: gradient matching with differentiable siamese augmentation.
    Published values (32 px, ConvNet-3)."""

    iterations: int = 1000
    lr_images: float = 0.1  # SGD on the images
    momentum: float = 0.5
    batch_real: int = 256  # real images per class per outer step (all of a smaller class)
    net_lr: float = 0.01  # SGD of the network between outer steps
    net_momentum: float = 0.0  # the DC/DSA script's; DC's later stand-alone script uses 0.5
    batch_train: int = 256  # synthetic images per step of that network training
    outer_loop: int = 0  # 0 = by images per class as published: 1 -> 1, 10 -> 10, 20 -> 20, ... 50 -> 50
    inner_loop: int = 0  # 0 = by images per class as published: 1 -> 1, 10 -> 50, 20 -> 25, 30 -> 20, 40 -> 15, 50 -> 10
    augment: str = "color_crop_cutout_flip_scale_rotate"  # DSA operations (one per class and step); "none"


@dataclass
class DistillConfig:
    m: int = 1000
    batch: int = 1024  # real batch of the methods that sample one (KRR-ST, naive bilevel)
    image_space: str = "normalized"  # "normalized" or "reference" (raw [0,1] synthetic pixels)
    flip: bool = True
    crop_pad: int = 4
    target_views: int = 1  # targets = teacher features averaged over this many crop/flip views (1 = plain)
    krr_st: KrrStConfig = field(default_factory=KrrStConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    mkdt: MkdtConfig = field(default_factory=MkdtConfig)
    mtt: MttConfig = field(default_factory=MttConfig)
    naive_bilevel: NaiveBilevelConfig = field(default_factory=NaiveBilevelConfig)
    kmeans: KmeansConfig = field(default_factory=KmeansConfig)
    dm: DmConfig = field(default_factory=DmConfig)
    dsa: DsaConfig = field(default_factory=DsaConfig)
    kip: KipConfig = field(default_factory=KipConfig)
    frepo: FrepoConfig = field(default_factory=FrepoConfig)


@dataclass
class PretrainConfig:
    archs: list[str] = field(default_factory=list)  # architecture transfer: also pre-train (and fine-tune) these
    epochs: int = 1000
    batch: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-3


@dataclass
class EvaluateConfig:
    seeds: int = 3
    protocols: list[str] = field(default_factory=lambda: ["linear", "finetune"])
    linear_fractions: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1, 1.0])
    linear_draws: int = 5  # label draws averaged when the fraction is below 1
    probe_features: str = "gap"  # "gap": the encoder's features; "flatten": the flattened last conv map (MKDT)
    # hyper-parameters are chosen on a validation split carved from the target's train split (never the test
    # split): this fraction of each class is held out of every label draw
    validation: float = 0.1
    linear_c_grid: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])  # inverse L2 strengths tried
    finetune_fractions: list[float] = field(default_factory=lambda: [0.1, 1.0])
    finetune_iters: int = 10_000
    finetune_batch: int = 256
    finetune_lr: float = 0.01
    finetune_momentum: float = 0.9
    finetune_weight_decay: float = 5e-4
    finetune_flip: bool = True
    finetune_crop_pad: int = 4
    test_split: float = 0.3  # for targets without their own test split
    kd_iters: int = 2000  # protocol "kd": distillation steps on the transfer set
    kd_temperature: float = 4.0
    kd_teacher: str = ""  # a supervised classifier encoder for the target; empty = trained here (model.arch)


@dataclass
class Config:
    seed: int = 0
    # the methods to distil, pre-train, evaluate and report, in table order (see ssdd.distill.registry)
    methods: list[str] = field(default_factory=lambda: ["krr_st", "random_subset", "no_pretrain", "full_ssl"])
    checkpoint_every: int = 1000  # steps between checkpoints of long stages (0 = by time and on stop only)
    checkpoint_minutes: float = 10.0  # ... and at least this often; neither changes results
    precision: str = "auto"  # "auto": bf16 autocast where the hardware has native bf16, else fp32; "fp32"; "bf16"
    # CUDA: deterministic kernels (slower), so a rerun or a resumed run equals an uninterrupted one bit for bit;
    # CPU kernels always are. Changes rounding only, so it is not part of any fingerprint.
    deterministic: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # pool models and students
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


CHOICES = {
    "precision": ("auto", "fp32", "bf16"),
    "distill.krr_st.pool_reset": ("fixed", "reference"),
    "distill.krr_st.compile": ("auto", "on", "off"),
    "distill.mkdt.init": ("high_loss", "random", "krr_st"),
    "distill.image_space": ("normalized", "reference"),
    "model.pool": ("gap", "flatten"),
    "model.norm": ("batch", "instance"),
    "teacher.model.norm": ("batch", "instance"),
    "evaluate.probe_features": ("gap", "flatten"),
    "teacher.optimizer": ("sgd", "adamw"),
    "teacher.model.pool": ("gap", "flatten"),
}


def presets_dir() -> Path:
    """Where presets live: $SSDD_CONFIGS, else the repository's ``configs/``."""
    env = os.environ.get("SSDD_CONFIGS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "configs"


def available_presets() -> list[str]:
    d = presets_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def _preset_path(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".toml":
        if not path.is_file():
            raise UserError(f"--preset: file {name} not found")
        return path
    path = presets_dir() / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"--preset: unknown preset '{name}' (available: {', '.join(available_presets()) or 'none'})")
    return path


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def valid_keys(obj: Any = None, prefix: str = "") -> list[str]:
    obj = Config() if obj is None else obj
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += valid_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _coerce(key: str, value: Any, default: Any, origin: str) -> Any:
    """Return ``value`` converted to the type of ``default`` or raise a one-line UserError."""
    if isinstance(value, str) and isinstance(default, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]  # --set key="text" is the same as --set key=text
    elif isinstance(value, str) and not isinstance(default, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"{origin}: {key}={value!r} is not a valid {type(default).__name__}") from None
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, list)
        if ok and default:
            value = [_coerce(key, v, default[0], origin) for v in value]
    else:
        ok = isinstance(value, str)
    if not ok:
        raise UserError(f"{origin}: {key} expects {type(default).__name__}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise UserError(f"{origin}: {key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    return value


def _assign(cfg: Config, key: str, value: Any, origin: str) -> None:
    *parents, leaf = key.split(".")
    obj: Any = cfg
    for part in parents:
        obj = getattr(obj, part, None)
        if not dataclasses.is_dataclass(obj):
            break
    if not dataclasses.is_dataclass(obj) or leaf not in {f.name for f in dataclasses.fields(obj)} \
            or dataclasses.is_dataclass(getattr(obj, leaf)):
        raise UserError(f"{origin}: unknown key '{key}' (valid keys: {', '.join(valid_keys())})")
    setattr(obj, leaf, _coerce(key, value, getattr(obj, leaf), origin))


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set: expected key=value, got '{pair}'")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def load_config(preset: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the preset file, then the overrides; validated."""
    cfg = Config()
    if preset:
        path = _preset_path(preset)
        try:
            table = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"--preset: {path} is not valid TOML ({err})") from None
        for key, value in _flatten(table).items():
            _assign(cfg, key, value, str(path))
    for key, value in (overrides or {}).items():
        _assign(cfg, key, value, "--set")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    positive = {
        "data.size": cfg.data.size, "distill.m": cfg.distill.m, "distill.krr_st.steps": cfg.distill.krr_st.steps,
        "distill.batch": cfg.distill.batch, "distill.krr_st.pool_size": cfg.distill.krr_st.pool_size,
        "distill.krr_st.pool_max_age": cfg.distill.krr_st.pool_max_age, "distill.target_views": cfg.distill.target_views,
        "distill.experts.count": cfg.distill.experts.count, "distill.experts.epochs": cfg.distill.experts.epochs,
        "distill.experts.batch": cfg.distill.experts.batch, "distill.mkdt.iterations": cfg.distill.mkdt.iterations,
        "distill.mkdt.syn_steps": cfg.distill.mkdt.syn_steps, "distill.mkdt.span": cfg.distill.mkdt.span,
        "distill.mkdt.max_start_epoch": cfg.distill.mkdt.max_start_epoch,
        "distill.mtt.iterations": cfg.distill.mtt.iterations, "distill.mtt.syn_steps": cfg.distill.mtt.syn_steps,
        "distill.mtt.span": cfg.distill.mtt.span, "distill.mtt.max_start_epoch": cfg.distill.mtt.max_start_epoch,
        "distill.mtt.experts.count": cfg.distill.mtt.experts.count,
        "distill.mtt.experts.epochs": cfg.distill.mtt.experts.epochs,
        "distill.mtt.experts.batch": cfg.distill.mtt.experts.batch,
        "distill.naive_bilevel.steps": cfg.distill.naive_bilevel.steps,
        "distill.naive_bilevel.inner_steps": cfg.distill.naive_bilevel.inner_steps, "teacher.epochs": cfg.teacher.epochs,
        "teacher.batch": cfg.teacher.batch, "pretrain.epochs": cfg.pretrain.epochs,
        "pretrain.batch": cfg.pretrain.batch, "evaluate.seeds": cfg.evaluate.seeds,
        "evaluate.finetune_iters": cfg.evaluate.finetune_iters,
        "evaluate.finetune_batch": cfg.evaluate.finetune_batch,
        "evaluate.kd_iters": cfg.evaluate.kd_iters, "evaluate.kd_temperature": cfg.evaluate.kd_temperature,
    }
    positive.update({"data.heldout": cfg.data.heldout, "distill.krr_st.check_models": cfg.distill.krr_st.check_models,
                     "distill.krr_st.check_batches": cfg.distill.krr_st.check_batches, "evaluate.linear_draws": cfg.evaluate.linear_draws,
                     "checkpoint_minutes": cfg.checkpoint_minutes})
    positive.update({"distill.kip.steps": cfg.distill.kip.steps, "distill.kip.models": cfg.distill.kip.models,
                     "distill.frepo.steps": cfg.distill.frepo.steps, "distill.frepo.pool_size": cfg.distill.frepo.pool_size,
                     "distill.frepo.pool_max_age": cfg.distill.frepo.pool_max_age})
    positive.update({"distill.dm.iterations": cfg.distill.dm.iterations, "distill.dm.batch_real": cfg.distill.dm.batch_real,
                     "distill.dsa.iterations": cfg.distill.dsa.iterations, "distill.dsa.batch_real": cfg.distill.dsa.batch_real,
                     "distill.dsa.batch_train": cfg.distill.dsa.batch_train})
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"config: {key} must be positive, got {value}")
    for key, value in {"seed": cfg.seed, "checkpoint_every": cfg.checkpoint_every,
                       "distill.dsa.outer_loop": cfg.distill.dsa.outer_loop, "distill.dsa.inner_loop": cfg.distill.dsa.inner_loop,
                       "data.source_max_per_class": cfg.data.source_max_per_class,
                       "data.target_max_per_class": cfg.data.target_max_per_class}.items():
        if value < 0:
            raise UserError(f"config: {key} must be 0 or more, got {value}")
    mkdt = cfg.distill.mkdt
    if mkdt.max_start_epoch + mkdt.span > cfg.distill.experts.epochs:
        raise UserError(f"config: distill.mkdt.max_start_epoch + distill.mkdt.span = {mkdt.max_start_epoch + mkdt.span} "
                        f"needs experts of that many epochs, but distill.experts.epochs = {cfg.distill.experts.epochs}")
    mtt = cfg.distill.mtt
    if mtt.max_start_epoch + mtt.span > mtt.experts.epochs:
        raise UserError(f"config: distill.mtt.max_start_epoch + distill.mtt.span = {mtt.max_start_epoch + mtt.span} "
                        f"needs experts of that many epochs, but distill.mtt.experts.epochs = {mtt.experts.epochs}")
    if not 0 <= cfg.evaluate.validation < 0.5:
        raise UserError(f"config: evaluate.validation must be in [0, 0.5), got {cfg.evaluate.validation}")
    if not cfg.methods:
        raise UserError("config: methods must name at least one method")
    if not 0 < cfg.evaluate.test_split < 1:
        raise UserError(f"config: evaluate.test_split must be between 0 and 1, got {cfg.evaluate.test_split}")
    for key in ("evaluate.linear_fractions", "evaluate.finetune_fractions"):
        for frac in _get(cfg, key):
            if not 0 < frac <= 1:
                raise UserError(f"config: {key} values must be in (0, 1], got {frac}")
    for proto in cfg.evaluate.protocols:
        if proto not in ("linear", "finetune", "kd"):
            raise UserError(f"config: evaluate.protocols: unknown protocol '{proto}' (valid: linear, finetune, kd)")
    if not cfg.data.targets:
        raise UserError("config: data.targets must name at least one target dataset")


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def fingerprint(section: Any) -> str:
    """A short stable hash of a config section: stage artifacts are reused only when it matches."""
    blob = json.dumps(section if isinstance(section, dict) else to_dict(section), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
