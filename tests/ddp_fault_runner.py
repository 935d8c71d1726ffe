"""Run advprop_zoo_train under torchrun with a fault on rank 1 at its second step (tests/test_distributed.py):
ADVPROP_TEST_FAULT=die (default) kills the rank; =nan gives that rank alone a non-finite loss."""
import os
import sys

import advprop_zoo.modes as modes
from advprop_zoo_train.main import main

_real = modes.forward_loss
_calls = []
_FAULT = os.environ.get('ADVPROP_TEST_FAULT', 'die')


def _fault_on_rank_1(*args, **kwargs):
    _calls.append(1)
    faulty = os.environ.get('RANK') == '1' and len(_calls) == 2
    if faulty and _FAULT == 'die':
        os._exit(3)  # a crashed rank: no cleanup, no goodbye to the process group
    out = _real(*args, **kwargs)
    if faulty and _FAULT == 'nan':
        out.loss = out.loss * float('nan')
    return out


modes.forward_loss = _fault_on_rank_1
sys.exit(main(sys.argv[1:]))
