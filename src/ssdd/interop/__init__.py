"""Distilled sets across tools: import other codes' sets into ssdd's artifact (:mod:`.readers` reads
their files under a weights-only policy, :mod:`.convert` applies ssdd's conventions) and export ours
(:mod:`.export`; Hugging Face datasets both ways: :mod:`.hf`). Formats in: ``krr_st``, ``mkdt``, ``npz``,
``imagefolder``, ``hf``; out: ``imagefolder``, ``npz``, ``hf``.

ssdd's own artifact, and the ``torch.utils.data.Dataset`` view of it, live in :mod:`ssdd.distilled_set`;
``DistilledDataset`` and ``load_distilled`` are importable from here as before.
"""

from ssdd.distilled_set import SPACE_NOTES, DistilledDataset, load_distilled
from ssdd.interop.convert import IMAGE_SPACES, OBJECTIVES, import_set, resolve_space, resolve_targets
from ssdd.interop.export import FORMATS_OUT, export_set, to_pixels
from ssdd.interop.readers import (FORMATS_IN, IMAGE_SUFFIXES, MKDT_STATS_HINT, READERS, TARGETS_FILE, load_pt,
                                  read_imagefolder, read_krr_st, read_mkdt, read_npz)

__all__ = ["FORMATS_IN", "FORMATS_OUT", "IMAGE_SPACES", "IMAGE_SUFFIXES", "MKDT_STATS_HINT", "OBJECTIVES", "READERS",
           "SPACE_NOTES", "TARGETS_FILE", "DistilledDataset", "export_set", "import_set", "load_distilled", "load_pt",
           "read_imagefolder", "read_krr_st", "read_mkdt", "read_npz", "resolve_space", "resolve_targets", "to_pixels"]
