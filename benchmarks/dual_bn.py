"""AdvProp train step: one pass in the 'split' BN route against two passes (main, then aux).

    python benchmarks/dual_bn.py            # B0, 128 px, 16 clean + 16 adversarial, fp32, CPU, 1 thread
    python benchmarks/dual_bn.py --quick

Both compute the same step: loss = CE(clean through the main BNs) + CE(adversarial through the
auxiliary BNs), backward, SGD. 'two passes' runs the model on each half with the route switched
between them; 'split' runs it once on the concatenated batch with each BN normalising its half
(the attack that makes the adversarial half is the same for both and is not timed). Timed in
alternating pairs, so load drift on a shared machine hits both alike; the median ratio is printed,
with the gradient difference between the two (they must agree to float32 noise).
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from advprop_zoo import bn_route, to_dual_bn, use_aux_bn  # noqa: E402
from advprop_zoo.table import format_table  # noqa: E402
from benchmarks.cpu_setup import cpu_name  # noqa: E402


def two_passes(model, opt, clean, adv, target) -> None:
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(clean), target)
    with use_aux_bn(model):
        loss = loss + F.cross_entropy(model(adv), target)
    loss.backward()
    opt.step()


def split_pass(model, opt, clean, adv, target) -> None:
    opt.zero_grad(set_to_none=True)
    with bn_route(model, 'split'):
        logits = model(torch.cat([clean, adv]))
    n = len(clean)
    loss = F.cross_entropy(logits[:n], target) + F.cross_entropy(logits[n:], target)
    loss.backward()
    opt.step()


def main(argv: List[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='efficientnet_b0_advprop')
    p.add_argument('--img-size', type=int, default=128)
    p.add_argument('--batch-size', type=int, default=16, help='per half: clean and adversarial each')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--pairs', type=int, default=7)
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--quick', action='store_true', help='3 pairs')
    args = p.parse_args(argv)
    pairs = 3 if args.quick else args.pairs
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base = to_dual_bn(timm.create_model(args.model, drop_rate=0.0, drop_path_rate=0.0)).train()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    base = base.to(memory_format=fmt)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.img_size, args.img_size)
    clean = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
    adv = (clean + 0.03 * torch.randn(shape, generator=g).sign()).contiguous(memory_format=fmt)
    target = torch.randint(0, 1000, (args.batch_size,), generator=g)

    # the two ways give the same gradients (up to float32 noise): check on identical copies, lr 0
    grads = []
    for step in (two_passes, split_pass):
        m = copy.deepcopy(base)
        step(m, torch.optim.SGD(m.parameters(), lr=0.0), clean, adv, target)
        grads.append(torch.cat([q.grad.flatten() for q in m.parameters()]))
    grad_diff = ((grads[0] - grads[1]).abs().max() / grads[0].abs().max()).item()

    steps = {'two passes (main, then aux)': two_passes, 'split, one pass': split_pass}
    models = {name: copy.deepcopy(base) for name in steps}
    opts = {name: torch.optim.SGD(models[name].parameters(), lr=1e-3, momentum=0.9) for name in steps}

    def run(name: str) -> tuple:
        wall, cpu = time.perf_counter(), time.process_time()
        steps[name](models[name], opts[name], clean, adv, target)
        return time.perf_counter() - wall, time.process_time() - cpu

    names = list(steps)
    for name in names:  # warmup
        run(name)
    times = {name: {'wall': [], 'cpu': []} for name in names}
    for i in range(pairs):
        for name in (names if i % 2 == 0 else names[::-1]):
            wall, cpu = run(name)
            times[name]['wall'].append(wall)
            times[name]['cpu'].append(cpu)
    ratio = {clock: statistics.median(a / b for a, b in zip(times[names[0]][clock], times[names[1]][clock]))
             for clock in ('wall', 'cpu')}
    rows = [[name, f"{statistics.median(t['wall']):.3f}", f"{statistics.median(t['cpu']):.3f}"] for name, t in times.items()]
    print(f'\n{args.model}, {args.img_size} px, {args.batch_size} clean + {args.batch_size} adversarial, fp32, CPU, '
          f'{args.threads} thread(s), {cpu_name()}, {"channels_last" if args.channels_last else "NCHW"}, median of {pairs} pairs\n')
    print(format_table(['train step', 'wall s', 'CPU s'], rows, align='lrr'))
    print(f"\nsplit is {ratio['cpu']:.2f}x as fast as two passes by CPU time, {ratio['wall']:.2f}x by wall time "
          f"(median of per-pair ratios); gradients agree to {grad_diff:.1e} of their max")


if __name__ == '__main__':
    main(sys.argv[1:])
