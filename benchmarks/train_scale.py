"""Data-parallel scaling of the AdvProp train step: 1 process against N under torch.distributed.

    python benchmarks/train_scale.py                   # CPU, gloo, 1 vs 2 processes
    python benchmarks/train_scale.py --device cuda     # one GPU per process, nccl (say which card)

Each process runs the same AdvProp step as ``advprop-zoo train`` (PGD-1 through the auxiliary BNs,
split-BN pass, synchronised dual BNs, DDP gradient averaging) on synthetic images, with a fixed batch
per process (weak scaling). On CPU the machine's cores are shared out: each of N processes gets
cores / N threads, so the ratio says what DDP + sync BN cost, not what more hardware buys. Printed:
images/s for each process count and the ratio to one process.
"""
import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _worker(rank: int, world: int, port: int, args, results) -> None:
    import timm
    from torch.nn.parallel import DistributedDataParallel

    import advprop_zoo  # noqa: F401
    from advprop_zoo.attacks import AttackConfig
    from advprop_zoo.dual_bn import convert_sync_dual_bn, to_dual_bn
    from advprop_zoo.modes import ModeConfig, forward_loss

    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    cuda = args.device == 'cuda'
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device('cuda', rank) if cuda else torch.device('cpu')
    if world > 1:
        dist.init_process_group('nccl' if cuda else 'gloo', rank=rank, world_size=world)
    torch.manual_seed(0)
    model = to_dual_bn(timm.create_model(args.model))
    if world > 1 and not args.no_sync_bn:
        model = convert_sync_dual_bn(model)
    model.to(device).train()
    step_model = DistributedDataParallel(model, device_ids=[rank] if cuda else None) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    cfg = ModeConfig('advprop', AttackConfig(eps=1))
    mean, std = model.pretrained_cfg['mean'], model.pretrained_cfg['std']
    g = torch.Generator().manual_seed(rank)
    x = (torch.rand(args.batch, 3, args.res, args.res, generator=g) * 2 - 1).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    ce = torch.nn.CrossEntropyLoss()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = forward_loss(step_model, x, y, ce, cfg, mean, std, attack_model=model).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if world > 1:
            dist.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        results[world] = args.batch * world / statistics.median(times)
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='efficientnet_b0_advprop')
    p.add_argument('--res', type=int, default=128)
    p.add_argument('--batch', type=int, default=8, help='images per process')
    p.add_argument('--procs', type=int, nargs='+', default=[1, 2])
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    p.add_argument('--no-sync-bn', action='store_true', help='per-rank BN statistics (shows what sync BN costs)')
    args = p.parse_args()
    from advprop_zoo.table import format_table
    results = mp.Manager().dict()
    for world in args.procs:
        mp.spawn(_worker, args=(world, _free_port(), args, results), nprocs=world, join=True)
    base = results[args.procs[0]]
    card = torch.cuda.get_device_name(0) if args.device == 'cuda' else f'CPU, {os.cpu_count()} cores'
    print(f'AdvProp PGD-1 step, {args.model} {args.res}px, {args.batch} images per process, {card}, '
          f'{"per-rank" if args.no_sync_bn else "synchronised"} BNs, median of {args.steps} steps')
    print(format_table(['processes', 'images/s', 'vs 1 process'],
                       [[w, f'{results[w]:.1f}', f'{results[w] / base:.2f}x'] for w in args.procs], align='rrr'))


if __name__ == '__main__':
    main()
