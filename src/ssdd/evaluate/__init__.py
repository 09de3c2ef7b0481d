"""Transfer evaluation: fine-tune, linear probe (also with few labels), the suite, paired statistics."""

from ssdd.evaluate.finetune import finetune_accuracy
from ssdd.evaluate.linear import ProbeResult, frozen_features, linear_probe, linear_probe_accuracy, probe_extractor, select_c
from ssdd.evaluate.stats import mean_std, paired_interval
from ssdd.evaluate.suite import Target, evaluate_encoder, label_index, validation_split

__all__ = ["finetune_accuracy", "frozen_features", "linear_probe", "linear_probe_accuracy", "probe_extractor",
           "select_c", "ProbeResult", "mean_std", "paired_interval", "Target", "evaluate_encoder", "label_index",
           "validation_split"]
