"""The fingerprint rule of folders made before inputs were recorded (format 1), frozen, to accept their work.

Until format 2 (:mod:`ssdd.fingerprint`), an artifact's fingerprint hashed whole config sub-trees of the
*current* config. Folders made that way keep their finished stages, sets, encoders, evaluation units and
checkpoints: where an artifact holds no recorded inputs, it is fresh when its stored fingerprint equals what
this frozen copy of the old rule gives for the current config. The config is cut down to the keys that
existed then (``KEYS``), so keys added later never disturb the comparison; methods' and preps' declared
sections are frozen here too (``METHOD_NEEDS``). Do not change this file: it describes the past.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

KEYS = frozenset((
    "seed", "methods", "checkpoint_every", "checkpoint_minutes", "precision", "deterministic", "data.source",
    "data.source_max_per_class", "data.size", "data.heldout", "data.targets", "data.target_max_per_class",
    "model.arch", "model.widths", "model.pool", "model.norm", "teacher.path", "teacher.extra_sources",
    "teacher.model.arch", "teacher.model.widths", "teacher.model.pool", "teacher.model.norm", "teacher.epochs",
    "teacher.batch", "teacher.optimizer", "teacher.lr", "teacher.momentum", "teacher.weight_decay",
    "teacher.projector", "teacher.redundancy_weight", "teacher.min_crop_scale", "teacher.hue", "distill.m",
    "distill.batch", "distill.image_space", "distill.flip", "distill.crop_pad", "distill.target_views",
    "distill.krr_st.steps", "distill.krr_st.lr_images", "distill.krr_st.lr_targets",
    "distill.krr_st.final_lr_ratio", "distill.krr_st.ridge", "distill.krr_st.pool_size",
    "distill.krr_st.pool_max_age", "distill.krr_st.pool_reset", "distill.krr_st.pool_lr",
    "distill.krr_st.pool_momentum", "distill.krr_st.pool_weight_decay", "distill.krr_st.check_batches",
    "distill.krr_st.check_models", "distill.krr_st.chunk", "distill.krr_st.fold_bn", "distill.krr_st.compile",
    "distill.krr_st.teacher_cache_views", "distill.experts.count", "distill.experts.epochs", "distill.experts.lr",
    "distill.experts.momentum", "distill.experts.weight_decay", "distill.experts.batch", "distill.experts.augment",
    "distill.mkdt.iterations", "distill.mkdt.syn_steps", "distill.mkdt.span", "distill.mkdt.max_start_epoch",
    "distill.mkdt.lr_images", "distill.mkdt.lr_targets", "distill.mkdt.lr_lr", "distill.mkdt.lr_init",
    "distill.mkdt.momentum", "distill.mkdt.batch_syn", "distill.mkdt.init", "distill.mtt.iterations",
    "distill.mtt.syn_steps", "distill.mtt.span", "distill.mtt.max_start_epoch", "distill.mtt.lr_images",
    "distill.mtt.lr_lr", "distill.mtt.lr_init", "distill.mtt.momentum", "distill.mtt.batch_syn",
    "distill.mtt.experts.count", "distill.mtt.experts.epochs", "distill.mtt.experts.lr",
    "distill.mtt.experts.momentum", "distill.mtt.experts.weight_decay", "distill.mtt.experts.batch",
    "distill.mtt.experts.augment", "distill.naive_bilevel.steps", "distill.naive_bilevel.inner_steps",
    "distill.naive_bilevel.inner_lr", "distill.naive_bilevel.lr_images", "distill.naive_bilevel.redundancy_weight",
    "distill.naive_bilevel.projector", "distill.kmeans.batch_size", "distill.kmeans.n_init",
    "distill.kmeans.max_iter", "distill.dm.iterations", "distill.dm.lr_images", "distill.dm.momentum",
    "distill.dm.batch_real", "distill.dm.augment", "distill.dsa.iterations", "distill.dsa.lr_images",
    "distill.dsa.momentum", "distill.dsa.batch_real", "distill.dsa.net_lr", "distill.dsa.net_momentum",
    "distill.dsa.batch_train", "distill.dsa.outer_loop", "distill.dsa.inner_loop", "distill.dsa.augment",
    "distill.kip.steps", "distill.kip.lr_images", "distill.kip.lr_labels", "distill.kip.ridge",
    "distill.kip.models", "distill.kip.learn_labels", "distill.frepo.steps", "distill.frepo.lr_images",
    "distill.frepo.final_lr_ratio", "distill.frepo.ridge", "distill.frepo.pool_size", "distill.frepo.pool_max_age",
    "distill.frepo.pool_lr", "distill.frepo.pool_momentum", "distill.frepo.pool_weight_decay", "pretrain.archs",
    "pretrain.epochs", "pretrain.batch", "pretrain.lr", "pretrain.momentum", "pretrain.weight_decay",
    "evaluate.seeds", "evaluate.protocols", "evaluate.linear_fractions", "evaluate.linear_draws",
    "evaluate.probe_features", "evaluate.validation", "evaluate.linear_c_grid", "evaluate.finetune_fractions",
    "evaluate.finetune_iters", "evaluate.finetune_batch", "evaluate.finetune_lr", "evaluate.finetune_momentum",
    "evaluate.finetune_weight_decay", "evaluate.finetune_flip", "evaluate.finetune_crop_pad",
    "evaluate.test_split", "evaluate.kd_iters", "evaluate.kd_temperature", "evaluate.kd_teacher",
))

SOURCE_KEYS = ("seed", "data.source", "data.source_max_per_class", "data.size", "data.heldout")
DISTILL_COMMON = ("distill.m", "distill.batch", "distill.image_space", "distill.flip", "distill.crop_pad",
                  "distill.target_views")
PRETRAIN_KEYS = ("pretrain.epochs", "pretrain.batch", "pretrain.lr", "pretrain.momentum", "pretrain.weight_decay")
TARGET_KEYS = ("data.size", "data.target_max_per_class", "evaluate.test_split")
EVALUATE_KEYS = tuple(f"evaluate.{name}" for name in (
    "protocols", "linear_fractions", "linear_draws", "probe_features", "validation", "linear_c_grid",
    "finetune_fractions", "finetune_iters", "finetune_batch", "finetune_lr", "finetune_momentum",
    "finetune_weight_decay", "finetune_flip", "finetune_crop_pad", "test_split", "kd_iters", "kd_temperature",
    "kd_teacher"))
SECTIONS = {
    "prepare": ("seed", "data", "evaluate.test_split"),
    "teacher": SOURCE_KEYS + ("teacher",),
    "distill": SOURCE_KEYS + ("teacher", "model", "distill", "methods", "evaluate.seeds"),
    "pretrain": SOURCE_KEYS + ("teacher", "model", "distill", "methods", "evaluate.seeds", "pretrain"),
    "evaluate": ("seed", "data", "teacher", "model", "distill", "methods", "pretrain", "evaluate"),
    "report": ("seed", "data", "teacher", "model", "distill", "methods", "pretrain", "evaluate"),
}
METHOD_NEEDS = {  # method -> (needs, preps)
    "dm": (("distill.dm",), ()), "dsa": (("distill.dsa",), ()),
    "frepo": (("distill.frepo", "distill.krr_st"), ()), "high_loss": (("distill.experts",), ("experts",)),
    "kip": (("distill.kip",), ()), "kmeans": (("distill.kmeans",), ()),
    "krr_st": (("distill.krr_st",), ("teacher_views",)),
    "krr_st_experts": (("distill.krr_st", "distill.experts"), ("experts", "teacher_views")),
    "mkdt": (("distill.mkdt", "distill.experts"), ("experts",)),
    "mkdt_aug": (("distill.mkdt", "distill.experts"), ("experts_aug",)),
    "mtt": (("distill.mtt",), ("ce_experts",)), "naive_bilevel": (("distill.naive_bilevel",), ()),
    "random_ssl": ((), ()), "random_subset": ((), ()), "random_subset_labeled": ((), ()),
}
PREP_NEEDS = {"ce_experts": ("distill.mtt.experts",), "experts": ("distill.experts",),
              "experts_aug": ("distill.experts",), "teacher_views": ("distill.krr_st.teacher_cache_views",)}


def _hash(section: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(section, sort_keys=True).encode()).hexdigest()[:16]


def _then(tree: Any, prefix: str = "") -> Any:
    """The config as a dict with only the keys that existed in format 1."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                kept = _then(value, path + ".")
                if kept:  # a section added later (a new method's table) is absent, not an empty table
                    out[key] = kept
            elif path in KEYS:
                out[key] = value
        return out
    return tree


class Legacy:
    """Format-1 fingerprints of one config and resolved precision (``Run._fp`` and friends, as they were)."""

    def __init__(self, cfg: Any, precision: str):
        self.full, self.precision = _then(dataclasses.asdict(cfg)), precision

    def fp(self, keys: tuple[str, ...], **extra: Any) -> str:
        picked = dict(extra)
        if keys != SECTIONS["prepare"] and self.precision != "fp32":
            picked["precision"] = self.precision
        for key in keys:
            value = self.full
            for part in key.split("."):
                value = value[part]
            picked[key] = value
        return _hash(picked)

    def stage(self, stage: str) -> str:
        if stage == "prepare":
            return self.fp(SECTIONS[stage], source_labels="kept")
        return self.fp(SECTIONS[stage])

    def method(self, name: str, k: int) -> str | None:
        if name not in METHOD_NEEDS:
            return None  # a method newer than format 1
        needs, preps = METHOD_NEEDS[name]
        keys = SOURCE_KEYS + ("teacher", "model") + DISTILL_COMMON + needs
        keys += tuple(n for p in preps for n in PREP_NEEDS[p])
        return self.fp(keys, method=name, k=k)

    def prep(self, name: str) -> str | None:
        if name not in PREP_NEEDS:
            return None
        return self.fp(SOURCE_KEYS + ("teacher", "model") + DISTILL_COMMON + PREP_NEEDS[name], prep=name)

    def encoder(self, name: str, k: int, arch: str | None) -> str | None:
        if name == "full_ssl":
            return self.fp(SOURCE_KEYS + ("teacher",), method="full_ssl")
        if name == "no_pretrain":
            return self.fp(("seed", "model"), method="no_pretrain", k=k, arch=arch)
        set_fp = self.method(name, k)
        return None if set_fp is None else self.fp(PRETRAIN_KEYS, set=set_fp, arch=arch)

    def evaluation(self, name: str, enc_k: int, arch: str | None, target: str, k: int) -> str | None:
        encoder = self.encoder(name, enc_k, arch)
        return None if encoder is None else self.fp(EVALUATE_KEYS + TARGET_KEYS, encoder=encoder, target=target,
                                                    k=k, arch=arch)

    def kd(self, encoders: list[tuple[str, int]]) -> str | None:
        fps = [self.encoder(name, k, None) for name, k in encoders]
        return None if None in fps else self.fp(EVALUATE_KEYS + TARGET_KEYS + ("data.targets",), encoders=fps)

    @staticmethod
    def finetune(unit_fp: str, fraction: float) -> str:
        return _hash({"unit": unit_fp, "fraction": fraction})
