"""advprop_zoo_train: the training entry point, kept apart from the ``advprop_zoo`` library (as
``open_clip_train`` is from ``open_clip``). ``python -m advprop_zoo_train`` or ``advprop-zoo train``.

Imports run one way: ``main`` -> ``embedded`` (the demo) -> ``args`` (the flags) and ``loop`` (setup,
``train_one_epoch``, ``validate``, ``train``) -> ``data``, ``checkpoint``, ``distributed``, ``logs``. The loop
is ``loop``, not ``train``: this package's ``train`` is the function, which a submodule of that name
would be hidden behind (``import advprop_zoo_train.train as m`` would give the function)."""
from .args import build_parser
from .loop import TrainingError, TrainResult, train
from .main import main

__all__ = ['TrainingError', 'TrainResult', 'build_parser', 'main', 'train']
