"""`ssdd run` (:mod:`ssdd.run.core`, the stages in :mod:`ssdd.run.stages`) and the standalone commands."""

from ssdd.run.commands import (
           diagnose_grad_variance,
           evaluate_files,
           prepare_file,
           pretrain_file,
           run_compare,
)
from ssdd.run.core import STAGE_NAMES, Run, run_pipeline
from ssdd.run.setup import resolve_device, run_networks, run_precision

__all__ = ["Run", "STAGE_NAMES", "run_pipeline", "prepare_file", "pretrain_file", "evaluate_files",
           "diagnose_grad_variance", "run_compare", "resolve_device", "run_networks", "run_precision"]
