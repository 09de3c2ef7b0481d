"""The run folder's layout: the one place that knows its file names.

```
<out>/
  data/source_train.safetensors  data/source_heldout.safetensors  data/source_labels.safetensors
  data/target_<name>_train.safetensors  data/target_<name>_test.safetensors
  teacher.safetensors (or teacher.torchscript.pt)
  distilled/<method>[.seed<k>].safetensors      distilled/prep/<prep>.safetensors
  encoders/<method>[@<arch>][.seed<k>].safetensors
  evaluations/<group>/<method>[.seed<k>].<target>.json      evaluations/kd.json
  config.<stage>.json  timings.json  pretrain_log.json  results.json  results.csv  report.md  report.html  figures/
  compare.md  compare.csv  compare.json  compare.png  compare.html   (ssdd compare)
  tb/  (TensorBoard event files, with log = "tensorboard")
```

Seed 0 has no ``.seed<k>`` suffix, so a one-seed run reads like the paper's single set. The pipeline
writes these files; the report and ``ssdd compare`` read them through the same functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssdd import artifacts
from ssdd.config import fingerprint
from ssdd.data.sources import target_name

DISTILLED = "distilled"
ENCODERS = "encoders"
EVALUATIONS = "evaluations"
DATA = "data"
FIGURES = "figures"


def seed_suffix(k: int) -> str:
    """``""`` for the first seed, ``.seed<k>`` after."""
    return f".seed{k}" if k else ""


# ---- data ----------------------------------------------------------------------------------

def data_dir(out: Path) -> Path:
    return Path(out) / DATA


def source_path(out: Path, part: str) -> Path:
    """``data/source_<part>.safetensors``: ``train`` (what distillation draws from) or ``heldout``."""
    return data_dir(out) / f"source_{part}.safetensors"


def source_labels_path(out: Path) -> Path:
    """The source's labels, kept apart from its images: only labelled baselines read them."""
    return data_dir(out) / "source_labels.safetensors"


def unique_target_names(specs: list[str]) -> dict[str, str]:
    """Short names for targets; two specs with the same file stem get a hash suffix each."""
    stems = [target_name(s) for s in specs]
    return {s: (n if stems.count(n) == 1 else f"{n}-{fingerprint({'spec': s})[:6]}") for s, n in zip(specs, stems)}


def target_paths(out: Path, name: str) -> tuple[Path, Path]:
    """(train, test) files of the target called ``name`` (see :func:`unique_target_names`)."""
    return data_dir(out) / f"target_{name}_train.safetensors", data_dir(out) / f"target_{name}_test.safetensors"


# ---- stages' artifacts ------------------------------------------------------------------------

def teacher_path(out: Path, encoder: bool = True) -> Path:
    """``teacher.safetensors`` (an ssdd encoder), or ``teacher.torchscript.pt`` for a TorchScript teacher."""
    return Path(out) / ("teacher.safetensors" if encoder else "teacher.torchscript.pt")


def distilled_path(out: Path, method: str, k: int) -> Path:
    """``distilled/<method>.safetensors`` for the first seed, ``<method>.seed<k>.safetensors`` after."""
    return Path(out) / DISTILLED / f"{method}{seed_suffix(k)}.safetensors"


def prep_path(out: Path, name: str) -> Path:
    """A distillation preparatory stage's artifact, shared by the methods that need it."""
    return Path(out) / DISTILLED / "prep" / f"{name}.safetensors"


def first_seed_sets(out: Path) -> list[Path]:
    """``distilled/<method>.safetensors`` of the first seed of each method, sorted by name (later seeds
    and the preparatory stages' files are left out)."""
    folder = Path(out) / DISTILLED
    return [p for p in sorted(folder.glob("*.safetensors")) if ".seed" not in p.stem] if folder.is_dir() else []


def encoder_path(out: Path, method: str, k: int, arch: str | None = None) -> Path:
    """``encoders/<method>.safetensors`` for the first seed, ``<method>.seed<k>.safetensors`` after;
    ``<method>@<arch>...`` for the extra architectures of architecture transfer."""
    return Path(out) / ENCODERS / f"{method}{'@' + arch if arch else ''}{seed_suffix(k)}.safetensors"


def evaluation_path(out: Path, group: str, method: str, k: int, target: str) -> Path:
    """One (encoder, target) evaluation unit's rows."""
    return Path(out) / EVALUATIONS / group / f"{method}{seed_suffix(k)}.{target}.json"


def kd_path(out: Path) -> Path:
    """The rows of the ``kd`` protocol (every target, every seed: one unit)."""
    return Path(out) / EVALUATIONS / "kd.json"


def stage_config_path(out: Path, stage: str) -> Path:
    """``config.<stage>.json``: the resolved config and fingerprint a finished stage was run with."""
    return Path(out) / f"config.{stage}.json"


def pretrain_log_path(out: Path) -> Path:
    """``pretrain_log.json``: ``{"epoch_loss": {"<method>[@<arch>]/seed<k>": [loss per epoch]}}``."""
    return Path(out) / "pretrain_log.json"


def pretrain_log_key(method: str, k: int, arch: str | None = None) -> str:
    return f"{method}{'@' + arch if arch else ''}/seed{k}"


def results_paths(out: Path) -> tuple[Path, Path]:
    """``results.json`` and ``results.csv``: one row per (method, seed, target, protocol, labels)."""
    return Path(out) / "results.json", Path(out) / "results.csv"


def report_path(out: Path) -> Path:
    return Path(out) / "report.md"


def report_html_path(out: Path) -> Path:
    """``report.html``: report.md's content as one self-contained page (figures inline)."""
    return Path(out) / "report.html"


def compare_html_path(out: Path) -> Path:
    """``compare.html``: ``ssdd compare``'s table and plot as one self-contained page, beside compare.md."""
    return Path(out) / "compare.html"


def figures_dir(out: Path) -> Path:
    return Path(out) / FIGURES


# ---- wall times ------------------------------------------------------------------------------
# Kept out of the artifacts (they would not be byte-reproducible): ``timings.json`` maps a key to seconds.

def timings_path(out: Path) -> Path:
    return Path(out) / "timings.json"


def live_log_dir(out: Path) -> Path:
    """TensorBoard's event files (``log = "tensorboard"``, :mod:`ssdd.live_log`): ``tensorboard --logdir <out>/tb``."""
    return Path(out) / "tb"


def distill_timing_key(method: str, k: int) -> str:
    """The ``timings.json`` key of one method's distillation at seed ``k``."""
    return f"distill/{method}/seed{k}"


def prep_timing_key(name: str) -> str:
    """The ``timings.json`` key of a preparatory stage (shared by the methods that need it)."""
    return f"prep/{name}"


def read_timings(out: Path) -> dict[str, Any]:
    """``timings.json``, or ``{}`` when the run has none yet."""
    path = timings_path(out)
    return artifacts.read_json(path) if path.is_file() else {}
