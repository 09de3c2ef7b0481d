"""Self-supervised teachers: objectives, training, loading."""

from ssdd.teacher.barlow import barlow_twins_loss
from ssdd.teacher.load import FeatureExtractor, as_teacher, is_torchscript, load_teacher, load_teacher_module
from ssdd.teacher.train import train_barlow_twins

__all__ = ["barlow_twins_loss", "FeatureExtractor", "as_teacher", "is_torchscript", "load_teacher_module", "load_teacher", "train_barlow_twins"]
