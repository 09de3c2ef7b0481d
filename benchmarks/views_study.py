"""Issue 19's views study: one table of two run folders of the same preset, teacher and seeds, one made
without views and one with ``distill.views`` (``ssdd compare --out A ...`` and ``ssdd compare --out B
--set distill.views=rot ...``). Methods of the second folder are renamed ``<method>+views``, so each
view set stands beside its own method without views, paired by seed (the same initial draw, pre-training
seed and label draws), and beside ``random_subset`` and ``random_subset+views``. Writes ``compare.md``
/ ``.csv`` / ``.json`` / ``.png`` into ``--out`` through ssdd's own compare writers.

    python benchmarks/views_study.py --base runs/qs-study-base --views runs/qs-study-views --out DIR
    python benchmarks/views_study.py --base A --views rot=B --views crops=C --out DIR   # rows <method>+rot, +crops
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ssdd import distilled_set, layout
from ssdd.compare import write_compare

SHARED = ("no_pretrain", "full_ssl")  # encoders that make no set: the same in both folders


def rows_of(folder: Path, suffix: str) -> list[dict]:
    rows = json.loads((folder / "results.json").read_text())
    return [{**r, "method": r["method"] + suffix} for r in rows if not (suffix and r["method"] in SHARED)]


def storage_of(folder: Path, suffix: str) -> dict[str, int]:
    """Numbers each method's set stores: from the folder's sets, else from its compare.json."""
    where = layout.distilled_path(folder, "x", 0).parent
    sets = sorted(where.glob("*.safetensors")) if where.is_dir() else []
    out = {distilled_set.method_of(p) + suffix: distilled_set.stored_numbers(p) for p in sets if ".seed" not in p.name}
    if not out and (folder / "compare.json").is_file():
        out = {m + suffix: n for m, n in json.loads((folder / "compare.json").read_text()).get("storage", {}).items()}
    return out


def labelled(text: str) -> tuple[str, Path]:
    """``LABEL=FOLDER`` -> (LABEL, FOLDER); a bare FOLDER is labelled ``views``."""
    label, sep, folder = text.partition("=")
    return (label, Path(folder)) if sep else ("views", Path(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--views", action="append", required=True, type=labelled,
                        help="FOLDER (rows <method>+views) or LABEL=FOLDER (rows <method>+LABEL); repeatable")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--baseline", default="random_subset", help="the row every other is paired with")
    args = parser.parse_args()
    rows, storage = rows_of(args.base, ""), storage_of(args.base, "")
    for label, folder in args.views:
        rows += rows_of(folder, f"+{label}")
        storage.update(storage_of(folder, f"+{label}"))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    args.out.mkdir(parents=True, exist_ok=True)
    folders = ", ".join(str(f) for f in [args.base, *(f for _, f in args.views)])
    path = write_compare(args.out, rows, methods, args.baseline, storage=storage,
                         interval_note=f"seeds pair across the folders {folders}")
    print(path.read_text())


if __name__ == "__main__":
    main()
