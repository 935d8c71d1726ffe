"""Run advprop_zoo_train under torchrun with one rank dying mid-run (tests/test_distributed.py)."""
import os
import sys

import advprop_zoo.modes as modes
from advprop_zoo_train.main import main

_real = modes.forward_loss
_calls = []


def _dies_on_rank_1(*args, **kwargs):
    _calls.append(1)
    if os.environ.get('RANK') == '1' and len(_calls) == 2:
        os._exit(3)  # a crashed rank: no cleanup, no goodbye to the process group
    return _real(*args, **kwargs)


modes.forward_loss = _dies_on_rank_1
sys.exit(main(sys.argv[1:]))
