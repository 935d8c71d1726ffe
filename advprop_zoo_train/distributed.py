"""torch.distributed under torchrun: process-group setup, rank-aware device choice, metric reduction.

The run is distributed when torchrun's ``WORLD_SIZE`` > 1: gloo on CPU, nccl on CUDA, with a finite
collective timeout so a rank that dies ends the others with an error instead of a silent hang
(torchrun's agent then stops the job and names the failed rank).
"""
import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Sequence

import torch
import torch.distributed as dist
from timm.utils import reduce_tensor

__all__ = ['DistInfo', 'init_distributed', 'all_reduce_sum', 'all_gather', 'cleanup']


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device('cpu')

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
    if world_size > 1 and not dist.is_initialized():
        backend = 'nccl' if dev.type == 'cuda' else 'gloo'
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, local_rank, world_size, dev)


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


def cleanup() -> None:
    """Leave the process group, if this process joined one (at exit, whatever ended the run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
