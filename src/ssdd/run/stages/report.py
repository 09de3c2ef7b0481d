"""Stage ``report``: ``report.md``, ``report.html`` and their figures from the run folder."""

from __future__ import annotations

from pathlib import Path

from ssdd import layout, report_html
from ssdd.run.stages.base import Stage
from ssdd.run.state import RunState

INTERVAL_NOTE = ("Seed k is a whole replicate: the distillation's initial random draw (shared with that seed's "
                 "random_subset), the distillation's own randomness, the pre-training initialisation and the label "
                 "draws. The 95 % interval is a paired t-interval over seeds, so it covers distillation-to-distillation "
                 "variance; full_ssl is one encoder (the teacher), its seeds vary the evaluation only; the KD "
                 "experts are trained once per run and shared by every seed, so high_loss is the same set in every "
                 "seed and MKDT starts from it every time (their intervals cover their own randomness, pre-training "
                 "and label draws, not a different start).")


class Report(Stage):
    name, main_only = "report", True

    def outputs(self, run: RunState) -> list[Path]:
        return [layout.report_path(run.out), layout.report_html_path(run.out)]

    def run(self, run: RunState) -> None:
        report_html.write_reports(run.out, methods=list(run.cfg.methods), interval_note=INTERVAL_NOTE)
