"""ssdd: self-supervised dataset distillation for transfer learning (KRR-ST)."""

__version__ = "0.1.0"
