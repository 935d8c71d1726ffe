"""advprop_zoo_train: the training entry point, kept apart from the ``advprop_zoo`` library (as
``open_clip_train`` is from ``open_clip``). ``python -m advprop_zoo_train`` or ``advprop-zoo train``."""
from .main import TrainingError, TrainResult, build_parser, main, train

__all__ = ['TrainingError', 'TrainResult', 'build_parser', 'main', 'train']
