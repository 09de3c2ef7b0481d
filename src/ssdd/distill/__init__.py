"""Distillation methods behind one registry (see ``registry.py`` for how to add one).

Importing a method's module registers it; this package imports them all.
"""

from ssdd.distill import dm as _dm  # noqa: F401  (registration)
from ssdd.distill import dsa as _dsa  # noqa: F401
from ssdd.distill import experts as _experts  # noqa: F401
from ssdd.distill import frepo as _frepo  # noqa: F401
from ssdd.distill import kip as _kip  # noqa: F401
from ssdd.distill import krr_st as _krr_st  # noqa: F401
from ssdd.distill import mkdt as _mkdt  # noqa: F401
from ssdd.distill import mtt as _mtt  # noqa: F401
from ssdd.distill import naive_bilevel as _naive_bilevel  # noqa: F401
from ssdd.distill import subsets as _subsets  # noqa: F401
from ssdd.distill import teacher_cache as _teacher_cache  # noqa: F401
from ssdd.distill import variants as _variants  # noqa: F401
from ssdd.distill.check import heldout_batches, heldout_losses
from ssdd.distill.krr import krr_st_loss, ridge_predict
from ssdd.distill.krr_st import DistillResult, distill_krr_st
from ssdd.distill.pool import ModelPool
from ssdd.distill.registry import DistillContext, DistilledSet, Hooks, get, names, random_index

__all__ = ["heldout_batches", "heldout_losses", "krr_st_loss", "ridge_predict", "DistillResult",
           "distill_krr_st", "ModelPool", "DistillContext", "DistilledSet", "Hooks", "get", "names", "random_index"]
