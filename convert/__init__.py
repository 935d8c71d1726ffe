"""TF checkpoint conversion for advprop-zoo: the only code in the project that imports TensorFlow.

``python convert/tf_to_timm.py --help`` is the entry point. The modules:

- ``tf_names``      the TF variable name of every timm tensor, derived by walking the timm model
- ``tf_checkpoint`` finding and reading a checkpoint (tarball, folder or prefix) with TF's own reader
- ``tf_to_timm``    the conversion itself (EMA choice, completeness, aux BNs, safetensors out) and the CLI
- ``keras_reference`` the numerical cross-check against Keras's independent EfficientNet
- ``tf_fixture``    synthetic checkpoints laid out like the release, for the tests and the benchmark
"""
import os

# TF and absl print start-up chatter on stderr; a converter's stderr is for its own one-line errors
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('KERAS_BACKEND', 'tensorflow')

import timm  # noqa: E402,F401  before TensorFlow, always: importing timm after TF 2.21 segfaults (torch 2.14)

__version__ = '1.0.0'  # written into every converted file; bump when converted outputs would change
