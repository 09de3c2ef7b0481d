"""Fixed views of a set's images, each with a target of its own (issue 19, after Boost-SSL-DD).

A set with views stores, beside its m images and base targets, a target for each of K-1 further fixed,
deterministic views of every image (view 0 is the image itself). Pre-training then regresses all m·K
(view, target) pairs, so each stored image teaches the student the teacher's output at K points.

- :mod:`ssdd.views.transforms`: the view families (rotations, flips, a crop grid) and how to apply them;
- :mod:`ssdd.views.approx`: the optional approximation network that stores view targets as shifts
  predicted from the base target (one small MLP per view) instead of storing them.
"""

from ssdd.views.transforms import FAMILIES, NONE, apply_view, count, expand, expand_targets

__all__ = ["FAMILIES", "NONE", "apply_view", "count", "expand", "expand_targets"]
