"""KRR-ST and its baselines: a distilled set from a source and a teacher."""

from ssdd.distill.check import heldout_batches, heldout_losses
from ssdd.distill.krr import krr_st_loss, ridge_predict
from ssdd.distill.krr_st import DistillResult, distill_krr_st, initial_set
from ssdd.distill.pool import ModelPool

__all__ = ["heldout_batches", "heldout_losses", "krr_st_loss", "ridge_predict", "DistillResult",
           "distill_krr_st", "initial_set", "ModelPool"]
