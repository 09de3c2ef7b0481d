"""Shared engines of the distillation methods: ridge maths and the KRR-ST engine, model pools, trajectory
matching and its memory estimate, expert training, class-balanced sampling, seeding, label targets.

Engines register nothing and never import :mod:`ssdd.distill.methods` (``tests/test_layering.py``).
"""
