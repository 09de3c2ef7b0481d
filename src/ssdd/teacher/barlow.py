"""The Barlow Twins objective (Zbontar et al., 2021): defined in :mod:`ssdd.models.ssl`, re-exported here."""

from ssdd.models.ssl import barlow_twins_loss, standardize

__all__ = ["barlow_twins_loss", "standardize"]
