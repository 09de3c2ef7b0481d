"""ssdd: self-supervised dataset distillation for transfer learning (KRR-ST)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``ssdd.load_distilled`` on first use: importing ``ssdd`` stays cheap (no torch)."""
    if name == "load_distilled":
        from ssdd.distilled_set import load_distilled
        return load_distilled
    raise AttributeError(f"module 'ssdd' has no attribute {name!r}")
