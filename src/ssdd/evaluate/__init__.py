"""Transfer evaluation: fine-tune, linear probe (also with few labels), the suite."""

from ssdd.evaluate.finetune import finetune_accuracy
from ssdd.evaluate.linear import frozen_features, linear_probe_accuracy
from ssdd.evaluate.suite import Target, evaluate_encoder, label_index

__all__ = ["finetune_accuracy", "frozen_features", "linear_probe_accuracy", "Target", "evaluate_encoder",
           "label_index"]
