"""Distillation methods behind one registry (see ``registry.py`` for how to add one).

Methods live in ``methods/`` (one module per method or tight family, with its registrations and its
config section), the engines they share in ``engines/`` (no registrations; never importing a method).
Importing a method's module registers it; this package imports every module in ``methods/`` (found on
disk, so a new method needs no line here), before :mod:`ssdd.settings` assembles the config.
"""

import importlib
import pkgutil

from ssdd.distill import methods as _methods

for _found in pkgutil.iter_modules(_methods.__path__):  # importing a method module is its registration
    if not _found.name.startswith("_"):
        importlib.import_module(f"{_methods.__name__}.{_found.name}")

from ssdd.distill.engines.krr import krr_st_loss, ridge_predict
from ssdd.distill.engines.krr_engine import DistillResult, distill_krr_st
from ssdd.distill.engines.pool import ModelPool
from ssdd.distill.methods.krr_st import heldout_batches, heldout_losses
from ssdd.distill.registry import DistillContext, DistilledSet, Hooks, get, names, random_index

__all__ = ["heldout_batches", "heldout_losses", "krr_st_loss", "ridge_predict", "DistillResult",
           "distill_krr_st", "ModelPool", "DistillContext", "DistilledSet", "Hooks", "get", "names", "random_index"]
