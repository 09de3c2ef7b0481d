"""Distillation methods, one module per method (or a tight family), each with its registrations, its config
section (``register(name, config=...)``: defaults, fingerprint roles, checks) and its ``SMOKE`` settings (the
smallest config that runs it end to end, read by ``tests/test_methods.py``).

A method imports engines (:mod:`ssdd.distill.engines`) and the registry, never another method
(``tests/test_layering.py``). ``ssdd/distill/__init__.py`` imports every module here (those whose names
do not start with ``_``), found on disk: that is the registration.
"""
