"""`ssdd <stage>` commands: parse, call the library, turn user mistakes into one-line errors (exit 2)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from ssdd import __version__
from ssdd.errors import Stopped, UserError

STAGE_HELP = {
    "prepare": "prepare the source and target dataset files",
    "teacher": "train the self-supervised teacher (Barlow Twins)",
    "distill": "distil the source with every method in the preset's `methods` (KRR-ST, MKDT, baselines)",
    "pretrain": "pre-train encoders on each method's distilled sets (one per seed)",
    "evaluate": "transfer evaluation: linear probes and fine-tuning",
    "report": "write report.md with tables and figures, and report.html (the same, one self-contained page)",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UserError(message)


def _common(p: argparse.ArgumentParser, out_default: str | None = None) -> None:
    p.add_argument("--out", required=out_default is None, default=out_default, help="output folder")
    p.add_argument("--preset", default="demo", help="preset name in configs/ or a .toml file (default: demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set distill.krr_st.steps=100 (repeatable)")
    p.add_argument("--device", default=os.environ.get("SSDD_DEVICE", "auto"),
                   help="auto (a GPU when there is one), cpu, cuda, cuda:1, ... (default: $SSDD_DEVICE, else auto)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="network passes in bf16 autocast or fp32 (default: the preset's `precision`, auto = bf16 "
                        "only where a 2 s calibration of the run's own models measured it faster on this machine (cached; "
                        "SSDD_AUTO_PRECISION=fp32|bf16 overrides); "
                        "losses and ridge solves always fp32/fp64). The choice is logged and part of every "
                        "artifact's fingerprint")
    p.add_argument("--deterministic", action="store_true", help="CUDA: deterministic kernels (slower), so a rerun "
                   "or a resumed run is bit-identical; CPU runs always are (config: deterministic = true)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--log", choices=("none", "tensorboard"), help="tensorboard: live loss curves and pictures of "
                   "the synthetic sets in OUT/tb/ (tensorboard --logdir OUT/tb; pip install 'ssdd[tb]'); "
                   "default: the preset's `log`")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ssdd", description="Self-supervised dataset distillation (KRR-ST) for transfer learning.")
    parser.add_argument("--version", action="version", version=f"ssdd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    stage_parsers = {}
    for stage, text in STAGE_HELP.items():
        stage_parsers[stage] = p = sub.add_parser(stage, help=text, description=text)
        _common(p)
    prep = stage_parsers["prepare"]
    prep.add_argument("source", nargs="?", help="standalone: a raw dataset path (or bundled name) to convert; "
                      "--out is then the dataset file to write")
    prep.add_argument("--format", help="standalone: cifar10, cifar100, imagefolder, imagenet64, npz, bundled, hf "
                      "(a Hugging Face save_to_disk folder, or a folder or glob of parquet files; "
                      "pip install 'ssdd[hf]')")
    prep.add_argument("--size", type=int, default=32, help="standalone: image size in pixels (default 32)")
    prep.add_argument("--split", default="train", help="standalone: train, val or test (default train)")
    prep.add_argument("--max-per-class", type=int, default=None, help="standalone: keep at most K images per class")
    prep.add_argument("--image-column", help="standalone, --format hf: the image column (default: image or img; "
                      "in a spec: hf[image=COL]:PATH)")
    prep.add_argument("--label-column", help="standalone, --format hf: the label column (default: label or labels, "
                      "if any; none = unlabelled; in a spec: hf[label=COL]:PATH)")
    stage_parsers["distill"].add_argument("--teacher", help="a teacher trained elsewhere: ssdd encoder, state dict "
                                          "(.safetensors / .pt, weights only) or TorchScript")
    stage_parsers["pretrain"].add_argument("--distilled", help="standalone: pre-train on this distilled set")
    ev = stage_parsers["evaluate"]
    ev.add_argument("--encoder", nargs="+", help="standalone: encoder artifacts to evaluate, or 'none' (random init)")
    ev.add_argument("--targets", nargs="+", help="standalone: target specs (prepared file, FORMAT:PATH, folder, bundled)")
    ev.add_argument("--protocols", nargs="+", choices=("linear", "finetune", "kd"), help="protocols to run")
    ev.add_argument("--seeds", type=int, help="number of seeds")
    ev.add_argument("--label-fractions", nargs="+", type=float, help="label fractions for the linear probe")
    info = sub.add_parser("info", help="print one JSON object describing a prepared dataset file")
    info.add_argument("file")
    imp = sub.add_parser("import", help="convert another tool's distilled set into an ssdd distilled-set artifact")
    imp.add_argument("files", nargs="+", metavar="FILE", help="krr_st: x_syn.pt y_syn.pt; mkdt: images_N.pt "
                     "labels_N.pt [synlr_N.pt]; (or the folder holding them); npz: one .npz; imagefolder: a folder")
    imp.add_argument("--format", required=True, help="krr_st, mkdt, npz, imagefolder or hf (a Hugging Face "
                     "save_to_disk folder or parquet file: an `export --format hf` reads back exactly)")
    imp.add_argument("--out", required=True, help="the artifact to write, e.g. distilled/NAME.safetensors")
    imp.add_argument("--image-space", default="auto", help="auto (default: what the file records or its format's "
                     "code implies, else values within [0,1] = raw), raw (pixel/255) or normalized (needs --mean "
                     "and --std); for pixel data (PNGs, uint8 arrays): the space to store it in")
    imp.add_argument("--mean", nargs="+", type=float, help="per-channel mean the images were normalised with")
    imp.add_argument("--std", nargs="+", type=float, help="per-channel std the images were normalised with")
    imp.add_argument("--objective", default="auto", help="auto (labels / one-hot rows: cross_entropy, real-valued "
                     "vectors: mse), mse or cross_entropy (soft labels)")
    imp.add_argument("--method", help="the method name recorded in the set (default: the --out file's stem)")
    exp = sub.add_parser("export", help="write a distilled set for other tools: PNGs + targets.npz, one .npz, or a "
                         "Hugging Face dataset")
    exp.add_argument("distilled", help="a distilled-set artifact (.safetensors)")
    exp.add_argument("--format", required=True, help="imagefolder (a folder of PNGs in [0,1] pixel space and "
                     "targets.npz), npz (exact images, targets, lr and metadata) or hf (a datasets save_to_disk "
                     "folder: PNG and exact images, targets; lr and metadata in its info; pip install 'ssdd[hf]')")
    exp.add_argument("--out", required=True, help="imagefolder, hf: the folder to write; npz: the .npz file (or a "
                     "folder)")
    run = sub.add_parser("run", help="run the stages in order, skipping those already done for this config")
    _common(run)
    run.add_argument("--until", default=None, help="stop after this stage")
    demo = sub.add_parser("demo", help="ssdd run --preset demo --out runs/demo")
    _common(demo, out_default="runs/demo")
    cmp = sub.add_parser("compare", help="run every stage the methods still miss (resuming), then one table: "
                         "each method beside random_subset with paired 95 %% intervals (compare.md/csv/json/png/html)")
    _common(cmp)
    cmp.add_argument("--methods", nargs="+", help="methods to compare (default: the preset's `methods`)")
    cmp.add_argument("--paper-table", help="a CSV of published numbers (method,target,protocol,label_fraction,"
                     "accuracy in %%) shown beside ours, marked as such")
    diag = sub.add_parser("diagnose", help="diagnostics of the distillation objectives")
    diag.add_argument("what", choices=["grad-variance", "images-vs-targets"], help="grad-variance: variance of the "
                      "outer gradient w.r.t. the synthetic images over repeated draws, naive bilevel SSL vs KRR-ST; "
                      "images-vs-targets: a distilled set's held-out KRR-ST gain split into what its images and its "
                      "learned targets give, and how far each moved")
    _common(diag)
    diag.add_argument("--draws", type=int, default=16, help="grad-variance: gradient draws per method (default 16)")
    diag.add_argument("--method", default="krr_st", help="images-vs-targets: the method whose set to split "
                      "(default krr_st; sets with learned MSE targets)")
    diag.add_argument("--seed-index", type=int, default=0, help="images-vs-targets: which of the run's seeds, k for "
                      "seed + k (distilled/<method>.seed<k>.safetensors; default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[ssdd] %(message)s", stream=sys.stderr)
    try:
        args = build_parser().parse_args(argv)
        if args.command == "info":
            from ssdd.data.formats import dataset_info
            print(json.dumps(dataset_info(args.file)))
            return 0
        if args.command == "import":
            from ssdd.interop import import_set
            import_set(args.files, args.format, args.out, args.image_space, args.mean, args.std, args.objective,
                       args.method)
            return 0
        if args.command == "export":
            from ssdd.interop import export_set
            export_set(args.distilled, args.format, args.out)
            return 0
        from ssdd import run as commands
        from ssdd.allocator import keep_freed_memory
        from ssdd.settings import parse_overrides
        from ssdd.settings import load_config

        keep_freed_memory()

        overrides = parse_overrides(args.overrides)
        if getattr(args, "teacher", None):
            overrides["teacher.path"] = args.teacher
        if getattr(args, "precision", None):
            overrides["precision"] = args.precision
        if getattr(args, "deterministic", False):
            overrides["deterministic"] = "true"
        if getattr(args, "log", None):
            overrides["log"] = args.log
        if args.command == "evaluate":
            for option, key in (("protocols", "evaluate.protocols"), ("seeds", "evaluate.seeds"),
                                ("label_fractions", "evaluate.linear_fractions")):
                if getattr(args, option) is not None:
                    overrides[key] = json.dumps(getattr(args, option))
        cfg = load_config(args.preset, overrides)
        start = time.perf_counter()
        progress = not args.no_progress
        if args.command == "prepare" and args.source:
            if not args.format:
                raise UserError("prepare: --format is required with a SOURCE (cifar10, cifar100, imagefolder, hf, "
                                "imagenet64, npz, bundled)")
            commands.prepare_file(args.source, args.format, args.size, args.out, args.split, args.max_per_class,
                                  args.image_column, args.label_column, progress)
        elif args.command == "prepare" and (args.image_column or args.label_column):
            raise UserError("prepare: --image-column/--label-column go with a SOURCE; in a preset write the spec "
                            "hf[image=COL,label=COL]:PATH")
        elif args.command == "pretrain" and args.distilled:
            commands.pretrain_file(cfg, args.distilled, args.out, args.device, progress)
        elif args.command == "evaluate" and args.targets and not args.encoder:
            raise UserError("evaluate: --encoder is required with --targets (an encoder artifact, or 'none')")
        elif args.command == "evaluate" and args.encoder:
            if not args.targets:
                raise UserError("evaluate: --targets is required with --encoder")
            commands.evaluate_files(cfg, args.encoder, args.targets, args.out, args.device, progress)
        elif args.command == "compare":
            if args.methods:
                cfg.methods = list(args.methods)
            commands.run_compare(cfg, args.out, args.paper_table, args.device, progress)
        elif args.command == "diagnose" and args.what == "images-vs-targets":
            from ssdd.run.commands import diagnose_images_vs_targets
            diagnose_images_vs_targets(cfg, args.out, args.method, args.seed_index, args.device, progress)
        elif args.command == "diagnose":
            if args.draws < 2:
                raise UserError(f"--draws must be at least 2, got {args.draws}")
            commands.diagnose_grad_variance(cfg, args.out, args.draws, args.device, progress)
        elif args.command in ("run", "demo"):
            commands.run_pipeline(cfg, args.out, until=getattr(args, "until", None), device=args.device,
                                  progress=progress)
        elif args.command == "distill" and args.teacher:
            commands.run_pipeline(cfg, args.out, until="distill", device=args.device, progress=progress)
        else:
            commands.run_pipeline(cfg, args.out, only=args.command, device=args.device, progress=progress)
        logging.getLogger("ssdd").info("all done in %.1f s; artifacts in %s", time.perf_counter() - start, args.out)
        return 0
    except UserError as err:
        print(f"ssdd: error: {err}", file=sys.stderr)
        return 2
    except Stopped as err:
        print(f"ssdd: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("ssdd: interrupted", file=sys.stderr)
        return 130
