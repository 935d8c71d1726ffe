"""torch.distributed under torchrun: process-group setup, rank-aware device choice, metric reduction, and
what ends a job whose rank hangs.

The run is distributed when torchrun's ``WORLD_SIZE`` > 1: gloo on CPU, nccl on CUDA, with a finite
collective timeout (``--dist-timeout``) so a rank that dies or hangs ends the others with an error instead
of a silent hang. Two things name the rank at fault in one line:

- ``collective_failure``: after a collective fails, the ranks meet once more at ``monitored_barrier`` on a
  gloo group of their own (gloo even beside nccl), which tells rank 0 which ranks never arrived;
- ``StepWatchdog``: the hung rank itself, which waits in no collective and so never times out, exits after
  ``2 x --dist-timeout`` without a finished batch, saying so and dumping its threads' stacks. Without it the
  hung rank's torchrun agent would run on (an agent does not notice the others leaving, and on the node that
  hosts the rendezvous store nothing else ends it).
"""
import datetime
import faulthandler
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist
from timm.utils import reduce_tensor

__all__ = ['DistInfo', 'init_distributed', 'all_reduce_sum', 'all_gather', 'collective_failure', 'StepWatchdog',
           'cleanup']


_monitor: Any = None  # the gloo group of all ranks that collective_failure's monitored_barrier runs on


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device('cpu')
    monitor: Any = None  # a gloo group of all ranks for monitored_barrier (collective_failure)
    timeout_s: float = 600.0  # the collectives' timeout

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def primary(self) -> bool:
        """Only the primary process writes files and prints the progress bar."""
        return self.rank == 0


def init_distributed(device: str, timeout_s: float = 600.0) -> DistInfo:
    """Join the torchrun job described by the environment, if there is one, and pick this rank's device."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    dev = torch.device(device)
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError('--device cuda given but no CUDA device is available')
        if world_size > 1 and dev.index is not None:
            raise ValueError(f'--device {device} with {world_size} ranks would put every rank on GPU {dev.index}; '
                             'give --device cuda: torchrun gives each rank its LOCAL_RANK GPU')
        if dev.index is None:
            dev = torch.device('cuda', local_rank)
        torch.cuda.set_device(dev)
    global _monitor
    if world_size > 1:
        if not dist.is_initialized():
            backend = 'nccl' if dev.type == 'cuda' else 'gloo'
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        if _monitor is None:  # once per process group (the demo trains several runs in one)
            _monitor = dist.new_group(backend='gloo', timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, local_rank, world_size, dev, _monitor if world_size > 1 else None, timeout_s)


def all_reduce_sum(values: Sequence[float], info: DistInfo) -> List[float]:
    """Sum a few numbers over all ranks (identity in a single process), in float64 so image counts stay exact."""
    if not info.distributed:
        return list(values)
    # timm's reduce_tensor sums then divides by n: n = 1 is the plain sum
    return reduce_tensor(torch.tensor(list(values), dtype=torch.float64, device=info.device), 1).tolist()


def all_gather(obj: Any, info: DistInfo) -> Any:
    """Every rank's ``obj`` (a list indexed by rank) in a distributed run, ``obj`` itself otherwise."""
    if not info.distributed:
        return obj
    objs = [None] * info.world_size
    dist.all_gather_object(objs, obj)
    return objs


# what torch's backends say when a peer did not answer or went away (gloo, nccl, the c10d store)
_COLLECTIVE_ERROR = re.compile(r'Timed out waiting|timed out|Connection closed by peer|Connection reset by peer|'
                               r'NCCL|ProcessGroup|monitoredBarrier', re.I)


def collective_failure(error: BaseException, info: DistInfo) -> Optional[str]:
    """One line naming the rank(s) at fault after ``error`` ended a collective on this rank, or None when
    ``error`` is not a collective's failure (or the run is not distributed): the ranks meet at a
    ``monitored_barrier`` on the monitor group, which rank 0 learns the missing ranks from (within half the
    collective timeout, at most a minute); the other ranks say whether rank 0 itself answered."""
    backend_errors = tuple(getattr(dist, n) for n in ('DistBackendError', 'DistNetworkError') if hasattr(dist, n))
    if not info.distributed or info.monitor is None or not (
            isinstance(error, backend_errors) or _COLLECTIVE_ERROR.search(str(error))):
        return None
    waited = f'a collective on rank {info.rank} failed after waiting up to {info.timeout_s:g} s'
    try:
        dist.monitored_barrier(group=info.monitor, timeout=datetime.timedelta(seconds=max(1.0, min(
            info.timeout_s / 2, 60.0))), wait_all_ranks=True)
    except RuntimeError as e:
        text = str(e)
        missing = re.search(r'Ranks? ([\d, ]+) failed to pass monitoredBarrier', text)
        if missing:
            ranks = [int(r) for r in re.findall(r'\d+', missing.group(1))]
            who = 'rank' + ('s ' + ', '.join(map(str, ranks)) if len(ranks) > 1 else f' {ranks[0]}')
            return f'{waited}: {who} did not answer (hung or dead; its own log says which)'
        if re.search(r'Timed out', text, re.I):
            return f'{waited}: rank 0 did not answer (hung or dead; its own log says which)'
        return f'{waited}; rank 0\'s log names the rank that did not answer'
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f'{waited}, though every rank is alive: {first}'


class StepWatchdog:
    """Ends this process when no training batch has finished for ``timeout_s`` (``pet`` after each): the
    way a rank hung outside any collective (a stuck data loader, a dead mount, a wedged device) ends, where
    nothing else would time out. It prints one line naming the rank, dumps every thread's stack
    (faulthandler) and exits with status 1, so torchrun's agent sees a failed worker. A daemon thread that
    wakes once a second; ``pet`` is a float store, nothing in the step waits for it. Not armed until the
    first ``pet`` (start-up and compilation are not steps)."""

    def __init__(self, timeout_s: float, rank: int):
        self.timeout_s, self.rank = float(timeout_s), rank
        self._deadline: Optional[float] = None
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def pet(self) -> None:
        """A batch finished: the next must finish within ``timeout_s``."""
        self._deadline = time.monotonic() + self.timeout_s
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name='advprop-zoo-step-watchdog', daemon=True)
            self._thread.start()

    def pause(self) -> None:
        """No deadline until the next ``pet`` (work that is not a batch: the end of the run)."""
        self._deadline = None

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while not self._stopped.wait(1.0):
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                print(f'advprop-zoo train: error: rank {self.rank} is hung: no batch finished in '
                      f'{self.timeout_s:g} s (2 x --dist-timeout; a stuck data loader, storage or device); '
                      'its threads\' stacks follow, then it exits', file=sys.stderr, flush=True)
                try:
                    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                except (ValueError, OSError, AttributeError):  # a stderr without a file descriptor
                    pass
                sys.stderr.flush()
                os._exit(1)


def cleanup() -> None:
    """Leave the process group, if this process joined one (at exit, whatever ended the run)."""
    global _monitor
    _monitor = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
