"""Run advprop_zoo_train under torchrun with a fault on rank ADVPROP_TEST_FAULT_RANK (default 1; ``any``:
every rank this agent starts) at its ADVPROP_TEST_FAULT_STEP-th step (default 2), for tests/test_multinode.py;
only in torchrun's first attempt (TORCHELASTIC_RESTART_COUNT 0), so a restarted group runs clean:

ADVPROP_TEST_FAULT=kill  the rank waits until rank 0 has written the previous step's checkpoint (its folder
                         appears by rename, whole), then SIGKILLs itself: a node lost mid-run.
ADVPROP_TEST_FAULT=hang  the rank sleeps forever: a stuck rank (a dead NFS mount, a wedged data loader).
ADVPROP_TEST_FAULT=none  (default) no fault.
"""
import os
import signal
import sys
import time
from pathlib import Path

import advprop_zoo.modes as modes
from advprop_zoo_train.main import main

_real = modes.forward_loss
_calls = []
_FAULT = os.environ.get('ADVPROP_TEST_FAULT', 'none')
_RANK = os.environ.get('ADVPROP_TEST_FAULT_RANK', '1')
_STEP = int(os.environ.get('ADVPROP_TEST_FAULT_STEP', '2'))
_FIRST_ATTEMPT = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0'


def _output() -> Path:
    argv = sys.argv[1:]
    return Path(argv[argv.index('--output') + 1])


def _fault(*args, **kwargs):
    _calls.append(1)
    rank = os.environ.get('RANK')
    if _RANK in (rank, 'any') and len(_calls) == _STEP and _FIRST_ATTEMPT:
        if _FAULT == 'kill':
            ckpt = _output() / 'checkpoints' / f'step-{_STEP - 1:08d}'
            deadline = time.monotonic() + 60
            while not ckpt.is_dir() and time.monotonic() < deadline:
                time.sleep(0.05)
            print(f'rank {rank}: SIGKILL at step {_STEP} (after {ckpt.name})', file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        elif _FAULT == 'hang':
            print(f'rank {rank}: hanging at step {_STEP}', file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)
    return _real(*args, **kwargs)


modes.forward_loss = _fault
sys.exit(main(sys.argv[1:]))
