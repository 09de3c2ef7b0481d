"""Typed configuration: defaults in dataclasses, typed assignment, checks (presets and ``--set``: ssdd.settings).

One source of truth for every default: the dataclasses. A preset only lists what differs; ``--set
key=value`` overrides must match the default's type, and unknown keys are rejected with the list of
valid ones.

Who owns what. This module holds the core sections (data, model, teacher, the options every
distillation method shares, pretrain, evaluate), the fingerprint roles, and the machinery: typed
assignment, the checks, and the collection of method sections. Each method's own section lives with
the method (``ssdd/distill/methods/<name>.py``, or the engine whose parameter set it is), with its
``ROLES``, its ``CHOICES`` and its ``check(at, distill)``, and is handed over by its registration,
``register(name, config=Section)``, which calls :func:`add_section`. This module never imports
``ssdd.distill`` (``data/``, ``models/`` and ``teacher/`` import it), so it cannot know the sections by
itself: :mod:`ssdd.settings`, a layer above both, imports ``ssdd.distill`` (every method module) and then
:func:`assemble` builds the whole ``DistillConfig`` and ``Config`` as plain dataclasses. Make configs
with :func:`ssdd.settings.load_config`; every check, core and method, runs there, before any work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ssdd.config_roles import (  # noqa: F401  (re-exported: sections declare their roles from here)
    META, NO_NEUTRAL, NUMERICS, RESULT, Role, neutral, roles, roles_of)
from ssdd.errors import UserError


def positive(at: str, section: Any, names: str) -> None:
    """Refuse a value <= 0 of any of the space-separated ``names`` of ``section`` (the table at key ``at``)."""
    for name in names.split():
        value = getattr(section, name)
        if value <= 0:
            raise UserError(f"config: {at}.{name} must be positive, got {value}")


def nonnegative(at: str, section: Any, names: str) -> None:
    """Refuse a negative value of any of the space-separated ``names`` of ``section`` (at key ``at``)."""
    for name in names.split():
        value = getattr(section, name)
        if value < 0:
            raise UserError(f"config: {at}.{name} must be 0 or more, got {value}")


@dataclass
class ModelConfig:
    """A network from the registry (see ``ssdd.models``)."""

    arch: str = "convnet"
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    pool: str = "gap"  # convnet: "gap" (global average) or "flatten" (the paper's ConvNet)
    norm: str = "batch"  # convnet: "batch" (KRR-ST's ConvNet) or "instance" (MKDT's; no running statistics)
    ROLES: ClassVar[dict[str, Role]] = roles("arch widths pool", norm=neutral("batch"))
    # a section's allowed values of a string key, checked when a preset or --set assigns it
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"pool": ("gap", "flatten"), "norm": ("batch", "instance")}


@dataclass
class DataConfig:
    source: str = "mnist5k"  # spec: bundled name, prepared file, FORMAT:PATH (see ssdd.data.sources)
    source_max_per_class: int = 0  # 0 = all images
    size: int = 32
    heldout: int = 500  # source images never used to train teacher or distillation
    targets: list[str] = field(default_factory=lambda: ["digits"])
    target_max_per_class: int = 0  # cap on each target's labelled train images per class; 0 = all
    ROLES: ClassVar[dict[str, Role]] = roles("source size heldout targets", source_max_per_class=neutral(0), target_max_per_class=neutral(0))


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
    ROLES: ClassVar[dict[str, Role]] = roles("model epochs batch optimizer lr momentum weight_decay projector redundancy_weight min_crop_scale hue",
                                           path=neutral(""), extra_sources=neutral([]))
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"optimizer": ("sgd", "adamw")}


@dataclass
class DistillCommon:
    """The options every distillation method shares (``distill.m`` ...; part of every set's fingerprint).

    The whole ``distill`` table, :class:`ssdd.settings.DistillConfig`, subclasses this with one field per
    method section (``distill.krr_st``, ``distill.dm``, ...), each declared by its method's module; annotate
    with this class where only the shared options matter."""

    m: int = 1000
    batch: int = 1024  # real batch of the methods that sample one (KRR-ST, naive bilevel)
    image_space: str = "normalized"  # "normalized" or "reference" (raw [0,1] synthetic pixels)
    flip: bool = True
    crop_pad: int = 4
    target_views: int = 1  # targets = teacher features averaged over this many crop/flip views (1 = plain)
    # fixed views per image, each with its own target (ssdd.views): none, rot (Boost's 4 rotations), flip, rotflip
    # (the 8 symmetries of the square), crops.
    # Real subsets take the teacher's view targets, krr_st learns them; pre-training regresses every view
    views: str = "none"
    view_store: str = "targets"  # how view targets are stored: "targets", or "approx" (one small MLP per view)
    view_approx_hidden: int = 32  # hidden width of each view's MLP (view_store = "approx")
    ROLES: ClassVar[dict[str, Role]] = roles("m batch image_space flip crop_pad", target_views=neutral(1),
                                           views=neutral("none"), view_store=neutral("targets"),
                                           view_approx_hidden=neutral(32))
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"image_space": ("normalized", "reference"),
                                                     "views": ("none", "rot", "flip", "rotflip", "crops"),
                                                     "view_store": ("targets", "approx")}


RECIPES = ("short", "krr_st", "mkdt")  # pretrain.recipes: what each is, ssdd.pretrain_recipes


@dataclass
class PretrainConfig:
    archs: list[str] = field(default_factory=list)  # architecture transfer: also pre-train (and fine-tune) these
    epochs: int = 1000
    batch: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-3
    # named recipes (ssdd.pretrain_recipes): one = every encoder uses it; several = each method and seed keeps
    # the one whose linear probe scores best on the validation split of the in-domain target (never on test)
    recipes: list[str] = field(default_factory=lambda: ["short"])
    choose_on: str = ""  # the target spec the choice reads; "" = the one that is data.source, else the first
    ROLES: ClassVar[dict[str, Role]] = roles("epochs batch lr momentum weight_decay", archs=META,  # each encoder unit names its arch
                                           recipes=neutral(["short"]), choose_on=neutral(""))


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
    ROLES: ClassVar[dict[str, Role]] = roles("protocols linear_fractions linear_draws validation linear_c_grid finetune_fractions finetune_iters "
                                           "finetune_batch finetune_lr finetune_momentum finetune_weight_decay finetune_flip "
                                           "finetune_crop_pad test_split kd_iters kd_temperature",
                                           seeds=META, probe_features=neutral("gap"), kd_teacher=neutral(""))
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"probe_features": ("gap", "flatten")}


def _whole_config_only() -> DistillCommon:
    raise TypeError("ssdd.config.Config lacks the method sections: make configs with ssdd.settings "
                    "(load_config, or its Config)")


@dataclass
class Config:
    """The root of the config tree. Its ``distill`` here is typed by the shared options only; the class to
    instantiate is :class:`ssdd.settings.Config`, this class with the whole ``distill`` (see :func:`assemble`)."""

    seed: int = 0
    # the methods to distil, pre-train, evaluate and report, in table order (see ssdd.distill.registry)
    methods: list[str] = field(default_factory=lambda: ["krr_st", "random_subset", "no_pretrain", "full_ssl"])
    checkpoint_every: int = 1000  # steps between checkpoints of long stages (0 = by time and on stop only)
    checkpoint_minutes: float = 10.0  # ... and at least this often; neither changes results
    precision: str = "auto"  # "auto": bf16 autocast where the hardware has native bf16, else fp32; "fp32"; "bf16"
    # CUDA: deterministic kernels (slower), so a rerun or a resumed run equals an uninterrupted one bit for bit;
    # CPU kernels always are. Changes rounding only, so it is not part of any fingerprint.
    deterministic: bool = False
    # "tensorboard": live curves and pictures of the synthetic sets in <out>/tb/ (ssdd.live_log; needs the
    # tensorboard package, pip install 'ssdd[tb]'); neither key changes a result, so no fingerprint holds them
    log: str = "none"
    log_images_every: int = 0  # steps between pictures of a synthetic set; 0 = about 20 per distillation
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # pool models and students
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillCommon = field(default_factory=_whole_config_only)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ROLES: ClassVar[dict[str, Role]] = roles("seed data model teacher distill pretrain evaluate", methods=META, checkpoint_every=META,
                                           checkpoint_minutes=META, deterministic=NUMERICS,
                                           precision=META,  # the resolved precision is a unit input of its own
                                           log=META, log_images_every=META)
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"precision": ("auto", "fp32", "bf16"), "log": ("none", "tensorboard")}


# ---- method sections: declared beside their methods, collected here ----------------------------

_SECTIONS: dict[str, type] = {}  # name -> the dataclass of distill.<name>
_ASSEMBLED: dict[str, tuple[type, type]] = {}  # module -> (DistillConfig, Config), once assemble() ran


def add_section(name: str, cls: type) -> None:
    """Record ``cls`` as the type of ``distill.<name>``: :func:`ssdd.distill.registry.register` and
    ``register_prep`` call this for ``config=cls``. ``cls`` is a dataclass whose fields all have defaults and
    roles (``ROLES``); it may declare ``CHOICES`` (checked when a value is assigned) and ``check(self, at,
    distill)``, which :func:`validate` runs on every loaded config (``at`` is its key, ``"distill.dm"``;
    nested sections are checked too, at ``"distill.mtt.experts"``), raising a one-line UserError."""
    if _ASSEMBLED:
        raise TypeError(f"distill.{name}: registered after the config was assembled (ssdd.settings); "
                        "method modules belong in ssdd/distill/methods/, which ssdd.distill imports first")
    if name in {f.name for f in dataclasses.fields(DistillCommon)} or _SECTIONS.get(name, cls) is not cls:
        raise TypeError(f"distill.{name}: already a key of the distill config")
    roles_of(cls)  # every field has a fingerprint role
    cls()  # ... and a default
    _SECTIONS[name] = cls


def sections() -> dict[str, type]:
    """The registered method sections, by name."""
    return dict(sorted(_SECTIONS.items()))


def assemble(module: str) -> tuple[type, type]:
    """``(DistillConfig, Config)``: :class:`DistillCommon` plus one field per registered section (sorted by
    name), and :class:`Config` with that ``distill``. Both are plain dataclasses (named as in ``module``, which
    exports them), so attribute access, TOML tables, ``--set``, :func:`valid_keys`, ``dataclasses.asdict`` and
    the fingerprints' walk treat them as hand-written ones. :mod:`ssdd.settings` calls this once, after
    importing ``ssdd.distill``; no section can be added afterwards."""
    if module not in _ASSEMBLED:
        found = sections()
        distill = dataclasses.make_dataclass(
            "DistillConfig", [(name, cls, field(default_factory=cls)) for name, cls in found.items()],
            bases=(DistillCommon,), namespace={
                "__module__": module, "__doc__": "The whole ``distill`` table: the shared options "
                "(ssdd.config.DistillCommon) and one section per registered method or prep: " + ", ".join(found),
                "ROLES": {**DistillCommon.ROLES, **{name: RESULT for name in found}}})
        root = dataclasses.make_dataclass(
            "Config", [("distill", distill, field(default_factory=distill))], bases=(Config,),
            namespace={"__module__": module, "__doc__": Config.__doc__})
        _ASSEMBLED[module] = distill, root
    return _ASSEMBLED[module]


def valid_keys(obj: Any, prefix: str = "") -> list[str]:
    """Every leaf key of the config ``obj`` (:func:`ssdd.settings.valid_keys`: of the defaults)."""
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += valid_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _coerce(key: str, value: Any, default: Any, origin: str, choices: tuple[str, ...] | None = None) -> Any:
    """Return ``value`` converted to the type of ``default`` (and among ``choices``) or raise a one-line UserError."""
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
    if choices is not None and value not in choices:
        raise UserError(f"{origin}: {key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def assign(cfg: Config, key: str, value: Any, origin: str) -> None:
    """Set ``key`` (dotted) from a preset or ``--set``, coerced to its type and checked, or one UserError."""
    *parents, leaf = key.split(".")
    obj: Any = cfg
    for part in parents:
        obj = getattr(obj, part, None)
        if not dataclasses.is_dataclass(obj):
            break
    if not dataclasses.is_dataclass(obj) or leaf not in {f.name for f in dataclasses.fields(obj)} \
            or dataclasses.is_dataclass(getattr(obj, leaf)):
        raise UserError(f"{origin}: unknown key '{key}' (valid keys: {', '.join(valid_keys(cfg))})")
    choices = getattr(type(obj), "CHOICES", {}).get(leaf)
    setattr(obj, leaf, _coerce(key, value, getattr(obj, leaf), origin, choices))


def validate(cfg: Config) -> None:
    """The core sections' checks, then each method section's own (see :func:`add_section`)."""
    positive = {
        "data.size": cfg.data.size, "distill.m": cfg.distill.m, "distill.batch": cfg.distill.batch,
        "distill.target_views": cfg.distill.target_views, "teacher.epochs": cfg.teacher.epochs,
        "teacher.batch": cfg.teacher.batch, "pretrain.epochs": cfg.pretrain.epochs,
        "pretrain.batch": cfg.pretrain.batch, "evaluate.seeds": cfg.evaluate.seeds,
        "evaluate.finetune_iters": cfg.evaluate.finetune_iters,
        "evaluate.finetune_batch": cfg.evaluate.finetune_batch,
        "evaluate.kd_iters": cfg.evaluate.kd_iters, "evaluate.kd_temperature": cfg.evaluate.kd_temperature,
    }
    positive.update({"data.heldout": cfg.data.heldout, "evaluate.linear_draws": cfg.evaluate.linear_draws,
                     "checkpoint_minutes": cfg.checkpoint_minutes})
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"config: {key} must be positive, got {value}")
    for key, value in {"seed": cfg.seed, "checkpoint_every": cfg.checkpoint_every, "log_images_every": cfg.log_images_every,
                       "data.source_max_per_class": cfg.data.source_max_per_class,
                       "data.target_max_per_class": cfg.data.target_max_per_class}.items():
        if value < 0:
            raise UserError(f"config: {key} must be 0 or more, got {value}")
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
    if not cfg.pretrain.recipes or any(r not in RECIPES for r in cfg.pretrain.recipes):
        raise UserError(f"config: pretrain.recipes must name one or more of {', '.join(RECIPES)}, got {cfg.pretrain.recipes}")
    if cfg.pretrain.choose_on and cfg.pretrain.choose_on not in cfg.data.targets:
        raise UserError(f"config: pretrain.choose_on must be one of data.targets {cfg.data.targets}, got "
                        f"{cfg.pretrain.choose_on!r}")
    _check_sections(cfg.distill)


def _check_sections(distill: Any) -> None:
    """Every method section's ``check(at, distill)``, nested sections included (``distill.mtt.experts``)."""
    def walk(obj: Any, at: str) -> None:
        check = getattr(obj, "check", None)
        if callable(check):
            check(at, distill)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{at}.{f.name}")

    walk(distill, "distill")


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
