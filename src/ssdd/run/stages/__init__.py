"""The stages of ``ssdd run``, in order: one module each."""

from ssdd.run.stages.base import Stage
from ssdd.run.stages.distill import Distill
from ssdd.run.stages.evaluate import Evaluate
from ssdd.run.stages.prepare import Prepare
from ssdd.run.stages.pretrain import Pretrain
from ssdd.run.stages.report import Report
from ssdd.run.stages.teacher import Teacher

STAGES: tuple[Stage, ...] = (Prepare(), Teacher(), Distill(), Pretrain(), Evaluate(), Report())

__all__ = ["STAGES", "Stage"]
