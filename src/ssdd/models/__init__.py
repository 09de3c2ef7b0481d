"""Networks by name. Importing this package registers every model."""

from ssdd.models import alexnet, convnet, mobilenet, resnet, vgg  # noqa: F401  (registration side effect)
from ssdd.models import auto_precision
from ssdd.models.registry import Encoder, build, encoder_from_artifact, model_spec, names, register

__all__ = ["auto_precision", "Encoder", "build", "encoder_from_artifact", "model_spec", "names", "register"]
