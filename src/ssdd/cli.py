"""`ssdd <stage>` commands: parse, call the library, turn user mistakes into one-line errors (exit 2)."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from ssdd import __version__
from ssdd.errors import UserError

STAGE_HELP = {
    "prepare": "prepare the source and target dataset files",
    "teacher": "train the self-supervised teacher (Barlow Twins)",
    "distill": "distil the source with KRR-ST",
    "pretrain": "pre-train encoders on the distilled set and the random-subset baseline",
    "evaluate": "transfer evaluation: linear probes and fine-tuning",
    "report": "write report.md with tables and figures",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise UserError(message)


def _common(p: argparse.ArgumentParser, out_default: str | None = None) -> None:
    p.add_argument("--out", required=out_default is None, default=out_default, help="output folder")
    p.add_argument("--preset", default="demo", help="preset name in configs/ or a .toml file (default: demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set distill.steps=100 (repeatable)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ssdd", description="Self-supervised dataset distillation (KRR-ST) for transfer learning.")
    parser.add_argument("--version", action="version", version=f"ssdd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for stage, text in STAGE_HELP.items():
        _common(sub.add_parser(stage, help=text, description=text))
    run = sub.add_parser("run", help="run the stages in order, skipping those already done for this config")
    _common(run)
    run.add_argument("--until", default=None, help="stop after this stage")
    demo = sub.add_parser("demo", help="ssdd run --preset demo --out runs/demo")
    _common(demo, out_default="runs/demo")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[ssdd] %(message)s", stream=sys.stderr)
    try:
        args = build_parser().parse_args(argv)
        from ssdd.config import load_config, parse_overrides
        from ssdd.pipeline import run_pipeline

        cfg = load_config(args.preset, parse_overrides(args.overrides))
        start = time.perf_counter()
        if args.command in ("run", "demo"):
            run_pipeline(cfg, args.out, until=getattr(args, "until", None), device=args.device,
                         progress=not args.no_progress)
        else:
            run_pipeline(cfg, args.out, only=args.command, device=args.device, progress=not args.no_progress)
        logging.getLogger("ssdd").info("all done in %.1f s; artifacts in %s", time.perf_counter() - start, args.out)
        return 0
    except UserError as err:
        print(f"ssdd: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssdd: interrupted", file=sys.stderr)
        return 130
