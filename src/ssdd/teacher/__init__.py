"""Self-supervised teachers: objectives, training, loading."""

from ssdd.teacher.barlow import barlow_twins_loss
from ssdd.teacher.load import FeatureExtractor, load_teacher
from ssdd.teacher.train import train_barlow_twins

__all__ = ["barlow_twins_loss", "FeatureExtractor", "load_teacher", "train_barlow_twins"]
