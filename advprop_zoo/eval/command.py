"""The flags and the body of ``advprop-zoo eval``, kept here so cli.py stays a list of thin subcommands."""
import argparse
from pathlib import Path

import torch

from ..attacks import PAPER_STEPS_RULE
from ..malloc import keep_freed_memory
from ..weights import check_output_path
from .datasets import DATASETS
from .results import check_plotting, compare_results, format_results, plot_results, read_results, write_results
from .suite import EvalConfig, parse_eps, run_eval

__all__ = ['add_eval_arguments', 'eval_command']

DESCRIPTION = (
    'Evaluate a model the way the AdvProp paper did: ImageNet top-1/top-5, robust accuracy under a PGD/FGSM '
    'sweep over eps (0-255 pixel units), ImageNet-C per-corruption error, CE, mCE and relative mCE (AlexNet-'
    'normalised), ImageNet-A top-1 (logits cut to its 200 classes), Stylized-ImageNet top-1, or any ImageFolder. '
    'Preprocessing comes from the model\'s pretrained config through timm (size, bicubic, crop_pct, mean/std). '
    'An image that cannot be read (a truncated file, a non-image under an image name) is left out of every number '
    'and named: an excluded column and a line in the tables, "excluded" lists in the JSON. '
    'Prints Markdown tables; --output writes every number as JSON (written atomically). '
    '--compare A.json B.json prints two or more results side by side with deltas against the first.')


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The ``eval`` subcommand's flags."""
    p.add_argument('--model', help='timm model name, e.g. efficientnet_b0_advprop (a .tag picks pretrained weights)')
    w = p.add_mutually_exclusive_group()
    w.add_argument('--pretrained', action='store_true',
                   help="timm's pretrained weights (Hub cache; HF_HUB_OFFLINE works)")
    w.add_argument('--checkpoint', metavar='FILE', help='weights file (.safetensors, or .pth/.bin loaded weights_only; '
                   'dual-BN checkpoints are folded); its classifier size is used')
    p.add_argument('--num-classes', type=int, default=None, help='classifier size of --checkpoint, if not read from it')
    p.add_argument('--data-dir', metavar='DIR', help='dataset folder (class folders, or a folder holding val/); for '
                   'imagenet-c the folder of corruption folders')
    p.add_argument('--dataset', choices=DATASETS, default='imagenet',
                   help='layout and label space of --data-dir (default imagenet); folder: any ImageFolder whose class '
                        'count equals the model\'s')
    a = p.add_argument_group('robust accuracy')
    a.add_argument('--attack', choices=['pgd', 'fgsm'], default=None, help='also evaluate under this L-inf attack')
    a.add_argument('--eps', default=None, help='comma-separated eps in 0-255 pixel units (default 1,2,4)')
    a.add_argument('--steps', type=int, default=None,
                   help=f'PGD iterations (default: the paper\'s rule, {PAPER_STEPS_RULE})')
    a.add_argument('--step-size', type=float, default=None, help='PGD step in pixel units (default 1; FGSM: eps)')
    a.add_argument('--targeted', action='store_true', help='target a random wrong label (AdvProp\'s training attack) '
                   'instead of the default untargeted attack')
    c = p.add_argument_group('imagenet-c')
    c.add_argument('--corruptions', default=None, help='comma-separated subset of corruptions (mCE needs all 15)')
    c.add_argument('--clean-dir', metavar='DIR', default=None,
                   help='ImageNet val folder: also measure the clean error, for relative mCE')
    r = p.add_argument_group('run')
    r.add_argument('--batch-size', type=int, default=64, help='default 64')
    r.add_argument('--amp', choices=['bf16', 'fp16'], default=None, help='autocast dtype (default: float32)')
    r.add_argument('--channels-last', action='store_true', help='channels_last memory format')
    r.add_argument('--no-fuse', action='store_true', help='evaluate the model as built, without folding BNs into convs '
                   '(fusion computes the same function up to float rounding, faster)')
    r.add_argument('--device', default=None, help='cpu, cuda, cuda:1 ... (default: cuda if available)')
    r.add_argument('--workers', type=int, default=4, help='data loader worker processes (default 4)')
    r.add_argument('--cpu-malloc', default='reuse', choices=('reuse', 'default'),
                   help="on CPU, 'reuse' (default) keeps freed activation memory in the process instead of "
                        "page-faulting it in again every batch (glibc; advprop_zoo.malloc)")
    r.add_argument('--img-size', type=int, default=None, help='evaluate at this size instead of the model\'s own')
    r.add_argument('--seed', type=int, default=0, help='seed of attack random starts and targets (default 0)')
    r.add_argument('--no-progress', action='store_true', help='no progress bar')
    o = p.add_argument_group('output')
    o.add_argument('--output', metavar='JSON', default=None, help='write the results here (atomically)')
    o.add_argument('--plot', metavar='PNG', default=None, help='accuracy-vs-eps plot (--attack) or CE bar chart '
                   '(imagenet-c); needs matplotlib')
    o.add_argument('--compare', nargs='+', metavar='JSON', default=None,
                   help='compare results files instead of evaluating: A.json B.json [...], deltas against A')


def eval_command(args: argparse.Namespace) -> int:
    """Run ``advprop-zoo eval``: compare results files, or evaluate and print / write the results."""
    if args.compare:
        if len(args.compare) < 2:
            raise ValueError('--compare needs two or more results files')
        reports = [read_results(p) for p in args.compare]
        labels = [Path(p).stem for p in args.compare]
        if len(set(labels)) < len(labels):
            labels = list(args.compare)
        print(compare_results(reports, labels))
        return 0
    if not args.model:
        raise ValueError('--model is required (or --compare A.json B.json)')
    if not args.data_dir:
        raise ValueError('--data-dir is required')
    if not args.attack and (args.eps or args.steps or args.step_size or args.targeted):
        raise ValueError('--eps, --steps, --step-size and --targeted need --attack pgd|fgsm')
    if args.output:
        check_output_path(args.output, overwrite=True)
    if args.plot:
        check_output_path(args.plot, overwrite=True)
        if not args.attack and args.dataset != 'imagenet-c':
            raise ValueError('--plot needs --attack (accuracy vs eps) or --dataset imagenet-c (CE bar chart)')
        check_plotting()

    cfg = EvalConfig(
        model=args.model, data_dir=args.data_dir, dataset=args.dataset, checkpoint=args.checkpoint,
        pretrained=args.pretrained, num_classes=args.num_classes, attack=args.attack,
        eps=parse_eps(args.eps or '1,2,4') if args.attack else (), steps=args.steps, step_size=args.step_size,
        targeted=args.targeted, batch_size=args.batch_size, amp=args.amp, channels_last=args.channels_last,
        device=args.device, workers=args.workers, fuse=not args.no_fuse, img_size=args.img_size,
        corruptions=[c.strip() for c in args.corruptions.split(',') if c.strip()] if args.corruptions else None,
        clean_dir=args.clean_dir, seed=args.seed, progress=not args.no_progress)
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if args.cpu_malloc == 'reuse' and device == 'cpu':
        keep_freed_memory()  # fresh activations every batch: most of a CPU forward would be page faults
    report = run_eval(cfg)
    print(format_results(report))
    if args.output:
        write_results(report, args.output)
        print(f'\nresults: {args.output}')
    if args.plot:
        plot_results(report, args.plot)
        print(f'plot: {args.plot}')
    return 0
