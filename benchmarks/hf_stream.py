"""Reading a Hugging Face parquet dataset (format ``hf``): speed against PIL alone, and memory against input size.

    python benchmarks/hf_stream.py [--rows 20000] [--size 32] [--rounds 2]

Builds ``--rows`` 64x64 PNG images with labels in four parquet shards (a temp folder), then, each in a
fresh subprocess, alternating round by round: ``ssdd`` reading it through ``datasets`` (``hf:FOLDER``) and
a baseline that decodes the same PNG bytes with PIL alone (pyarrow batches, same resize, same threads).
A third reader takes one shard only: if rows were all held, peak memory would grow with the rows read,
while streaming keeps it flat. Prints the CPU model, then one JSON line per measurement (images per
second, peak RSS over the imports' own; Linux).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time


def build(folder: str, rows: int) -> None:
    import datasets
    import numpy as np
    from PIL import Image

    datasets.disable_progress_bars()
    rng = np.random.default_rng(0)
    images = []
    for _ in range(rows):  # smooth images, so PNGs have a realistic size (about 6 KB)
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64), Image.BILINEAR).save(
            buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    ds = datasets.Dataset.from_dict({"image": images, "label": (np.arange(rows) % 10).tolist()},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.ClassLabel(num_classes=10)}))
    os.makedirs(os.path.join(folder, "data"))
    for k in range(4):
        ds.shard(4, k, contiguous=True).to_parquet(os.path.join(folder, "data", f"train-{k:05d}-of-00004.parquet"))


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024


def child(reader: str, folder: str, size: int) -> dict:
    import datasets  # noqa: F401  (imports first: their memory is not the reader's)
    import pyarrow.parquet as pq
    import torch  # noqa: F401

    from ssdd.data.sources import load_source

    base = peak_rss_mb()
    start = time.perf_counter()
    if reader == "pil":
        from concurrent.futures import ThreadPoolExecutor

        import numpy as np
        from PIL import Image

        def one(data: bytes) -> np.ndarray:
            im = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.Resampling.BOX)
            return np.asarray(im)

        n = 0
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            for file in sorted(glob.glob(os.path.join(folder, "data", "*.parquet"))):
                for batch in pq.ParquetFile(file).iter_batches(batch_size=256, columns=["image"]):
                    n += len(list(pool.map(one, [r["bytes"] for r in batch.column(0).to_pylist()])))
    else:
        spec = f"hf:{folder}" if reader == "hf" else f"hf:{folder}/data/train-00000-of-00004.parquet"
        n = len(load_source(spec, size))
    seconds = time.perf_counter() - start
    return {"reader": reader, "images": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds),
            "peak_rss_over_imports_mb": round(peak_rss_mb() - base)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("READER", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.size)))
        return
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"# {model}, {os.cpu_count()} cores; {args.rows} PNG rows read at {args.size}px", flush=True)
    with tempfile.TemporaryDirectory(prefix="ssdd-hf-bench-") as folder:
        env = {**os.environ, "HF_DATASETS_CACHE": os.path.join(folder, "cache")}
        build(os.path.join(folder, "set"), args.rows)
        for _ in range(args.rounds):
            for reader in ("hf", "pil", "hf_one_shard"):
                out = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--child", reader,
                                      os.path.join(folder, "set")], env=env, check=True, capture_output=True, text=True)
                print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
