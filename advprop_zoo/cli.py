"""``advprop-zoo``: the command line. Each subcommand is a thin shell over a library function.

Packages built on the library add subcommands through the ``advprop_zoo.commands`` entry-point group
(``advprop-zoo train`` is ``advprop_zoo_train``'s), so the library never imports them: a command found
there gets the rest of the command line and parses it itself.
"""
import argparse
import sys
from importlib.metadata import EntryPoint, entry_points
from typing import Dict, List, Optional

import timm
import torch

from .efficientnet_advprop import DEFAULT_TAG, VARIANTS, ZOO_TAG
from .eval.command import DESCRIPTION as EVAL_DESCRIPTION, add_eval_arguments, eval_command
from .errors import run_command
from .export import export_model
from .fold import fold_checkpoint
from .load import load_model
from .modes import MODES
from .plan import (COUNTING_RULE, DEFAULT_BATCH_SIZE, IMAGENET_TRAIN_IMAGES, RECIPE_EPOCHS, plan_rows, plan_table,
                   read_measured, resolve_epochs)
from .table import format_table
from .version import __version__
from .weights import cached_weights_path

__all__ = ['main', 'build_parser', 'COMMAND_GROUP']

COMMAND_GROUP = 'advprop_zoo.commands'  # entry points: name -> callable(argv: list[str]) -> exit code


def plugin_commands() -> Dict[str, EntryPoint]:
    """Subcommands other installed packages register under ``COMMAND_GROUP``."""
    return {ep.name: ep for ep in entry_points(group=COMMAND_GROUP)}


def _cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for v in VARIANTS:
        with torch.device('meta'):  # count parameters from the real structure without allocating it
            model = timm.create_model(v.name)
        params = sum(p.numel() for p in model.parameters())
        cfg = model.pretrained_cfg
        cached = [tag for tag in (DEFAULT_TAG, ZOO_TAG)
                  if cached_weights_path(timm.models.get_pretrained_cfg(f'{v.name}.{tag}').hf_hub_id)]
        rows.append([v.name, f'{params / 1e6:.2f}M', cfg['input_size'][-1], f"{cfg['crop_pct']:.3f}",
                     str(v.attacker), f'{v.paper_top1:.1f}', f'{v.timm_top1:.3f}', ', '.join(cached) or 'no'])
    print(format_table(
        ['model', 'params', 'input', 'crop', 'attacker', 'paper top-1', 'timm top-1', 'cached'], rows,
        align='lrrrlrrl'))
    print(f'\nInputs are in [-1, 1] (mean = std = 0.5). Weights tag .{DEFAULT_TAG} (default) is timm\'s copy on the '
          f'Hub, .{ZOO_TAG} is this project\'s conversion; "cached" says which are in the local Hugging Face cache.')
    return 0


def _cmd_fold(args: argparse.Namespace) -> int:
    kwargs = {} if args.num_classes is None else {'num_classes': args.num_classes}
    out, kept, dropped = fold_checkpoint(args.input, args.output, args.model, overwrite=args.force, **kwargs)
    what = f'dropped {dropped} auxiliary BN tensors' if dropped else 'no auxiliary BN tensors found (already plain)'
    print(f'{out}: {kept} tensors for {args.model}, {what}; loads strictly into timm.create_model({args.model!r})')
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, checkpoint=args.checkpoint, pretrained=args.checkpoint is None,
                        num_classes=args.num_classes, fuse=True, input_size=args.input_size)
    size = loaded.input_size
    diff = export_model(loaded.model, args.output, size, format=args.format, overwrite=args.force, atol=args.atol)
    check = 'onnxruntime' if args.format == 'onnx' else 'the reloaded TorchScript module'
    print(f'{args.output}: {args.model} folded and BN-fused, static padding for {"x".join(map(str, size))}, '
          f'dynamic batch; {check} vs PyTorch max abs diff {diff:.2e}')
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    if args.model is None and not args.all:
        raise ValueError('give --model M, or --all for B0-B8')
    measured = read_measured(args.measured) if args.measured else None
    models = [v.name for v in VARIANTS] if args.all else [args.model]
    rows = plan_rows(models, mode=args.mode, gpus=args.gpus, epochs=resolve_epochs(args.epochs, args.recipe),
                     batch_size=args.batch_size, images=args.images, attack_eps=args.attack_eps,
                     attack_steps=args.attack_steps, p_adv=args.p_adv, clean_weight=args.clean_weight,
                     vanilla_images_per_s=args.vanilla_images_per_s, throughput_model=args.model, measured=measured)
    print(plan_table(rows, args.gpus, measured))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='advprop-zoo',
        description='AdvProp EfficientNets for timm: list the zoo, fold dual-BN checkpoints, export, evaluate, train.')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    p = sub.add_parser('list', help='table of the nine AdvProp models: params, input, crop, attacker, top-1, cache')
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser('fold', help='drop the auxiliary BNs of a dual-BN (AdvProp-trained) checkpoint',
                       description='Write a plain timm checkpoint from a dual-BN one: every *.aux_bn.* tensor is '
                                   'dropped, the rest is checked to load strictly into the model, and OUT is '
                                   'written atomically (safetensors).')
    p.add_argument('input', metavar='IN', help='dual-BN weights (.safetensors, or .pth/.bin loaded weights_only)')
    p.add_argument('output', metavar='OUT', help='plain weights to write (.safetensors)')
    p.add_argument('--model', required=True, help='timm model name the weights are for, e.g. efficientnet_b0_advprop')
    p.add_argument('--num-classes', type=int, default=None, help='classifier size (default: read from IN)')
    p.add_argument('--force', action='store_true', help='replace OUT if it exists')
    p.set_defaults(func=_cmd_fold)

    p = sub.add_parser('export', help='export the folded, BN-fused model to ONNX or TorchScript, checked against PyTorch',
                       description='Build the model (weights from --checkpoint, plain or dual-BN, else timm\'s pretrained '
                                   'weights), drop auxiliary BNs, fuse every BN into its conv, make TF "same" padding '
                                   'static for --input-size, export with a dynamic batch dimension, check the result '
                                   'against PyTorch (ONNX with onnxruntime) and write it atomically.')
    p.add_argument('--model', required=True, help='timm model name, e.g. efficientnet_b0_advprop')
    p.add_argument('--checkpoint', default=None, help='weights file (default: the pretrained weights, from the Hub cache)')
    p.add_argument('--format', choices=['onnx', 'torchscript'], default='onnx', help='default: onnx')
    p.add_argument('--input-size', type=int, nargs='+', default=None, metavar='N',
                   help='C H W, H W or H (default: the model\'s own, e.g. 3 224 224 for B0)')
    p.add_argument('--output', required=True, help='file to write (.onnx / .pt)')
    p.add_argument('--num-classes', type=int, default=None,
                   help='classifier size (default: read from --checkpoint; the model\'s own for pretrained weights)')
    p.add_argument('--atol', type=float, default=1e-4, help='max abs difference to PyTorch allowed (default 1e-4)')
    p.add_argument('--force', action='store_true', help='replace the output if it exists')
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser('eval', help='ImageNet top-1/5, robust accuracy, ImageNet-C mCE, ImageNet-A, Stylized; '
                       '--compare results', description=EVAL_DESCRIPTION)
    add_eval_arguments(p)
    p.set_defaults(func=eval_command)

    p = sub.add_parser('plan', help='plan a re-training: step cost against vanilla, steps, images, GPU-hours',
                       description='Print, for planning a re-training, one Markdown row per model: attack passes '
                                   'per step, the step cost in vanilla-step units (counted; measured from '
                                   '--measured), global batch, steps and images per epoch and in total, and '
                                   'GPU-hours from a vanilla throughput you give or --measured holds (never '
                                   'guessed). ' + COUNTING_RULE)
    p.add_argument('--model', default=None,
                   help='zoo model, e.g. efficientnet_b0_advprop; with --all, the model --vanilla-images-per-s '
                        'was measured on')
    p.add_argument('--all', action='store_true', help='every size B0-B8, each with its paper attacker and resolution')
    p.add_argument('--mode', default='advprop', metavar='MODE', help=f'{" | ".join(MODES)} (default advprop)')
    p.add_argument('--gpus', type=int, default=1, metavar='N', help='data-parallel GPUs (default 1)')
    p.add_argument('--batch-size', '-b', type=int, default=DEFAULT_BATCH_SIZE, metavar='N',
                   help=f'per GPU (default {DEFAULT_BATCH_SIZE}); global = this x --gpus, e.g. 64 x 64 = 4096 as '
                        f'the paper')
    p.add_argument('--epochs', type=int, default=None, metavar='N', help='default: the --recipe\'s')
    p.add_argument('--recipe', default=None, metavar='NAME',
                   help='epochs of a train preset: ' + ', '.join(f'{k} {v}' for k, v in RECIPE_EPOCHS.items()))
    p.add_argument('--images', type=int, default=IMAGENET_TRAIN_IMAGES, metavar='N',
                   help=f'training images per epoch (default {IMAGENET_TRAIN_IMAGES:,}, ImageNet-1k train)')
    p.add_argument('--attack-eps', type=float, default=None, metavar='EPS',
                   help='advprop / adv-train: PGD budget in pixels (default: the paper\'s for the size)')
    p.add_argument('--attack-steps', type=int, default=None, metavar='K',
                   help='advprop / adv-train: PGD steps (default: the paper\'s rule from the eps)')
    p.add_argument('--p-adv', type=float, default=0.2, metavar='P',
                   help='fast-advprop: fraction of each batch attacked (default 0.2)')
    p.add_argument('--clean-weight', type=float, default=0.5, metavar='A',
                   help='adv-train: clean loss weight; 0 (Madry) skips the clean half of the pass (default 0.5)')
    p.add_argument('--vanilla-images-per-s', type=float, default=None, metavar='X',
                   help='vanilla training images/s per GPU measured on --model; gives GPU-hours')
    p.add_argument('--measured', default=None, metavar='FILE.json',
                   help='benchmarks/gpu.py\'s JSON: measured ratios, and its vanilla images/s for its model')
    p.set_defaults(func=_cmd_plan)

    for name, ep in sorted(plugin_commands().items()):  # their own parsers own their flags
        doc = (getattr(ep.load(), '__doc__', None) or '').strip().splitlines()
        sub.add_parser(name, add_help=False, help=f'{doc[0] if doc else ep.value} (see advprop-zoo {name} --help)')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    plugin = plugin_commands().get(argv[0]) if argv else None
    if plugin is not None:
        return plugin.load()(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    return run_command(f'advprop-zoo {args.command}', lambda: args.func(args))


if __name__ == '__main__':
    sys.exit(main())
