"""``advprop-zoo``: the command line. Each subcommand is a thin shell over a library function."""
import argparse
import sys
from typing import List, Optional

__all__ = ['main']


def _cmd_list(args: argparse.Namespace) -> int:
    import timm
    import torch

    from .efficientnet_advprop import DEFAULT_TAG, VARIANTS, ZOO_TAG
    from .table import format_table
    from .weights import cached_weights_path

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
    from .fold import fold_checkpoint

    kwargs = {} if args.num_classes is None else {'num_classes': args.num_classes}
    out, kept, dropped = fold_checkpoint(args.input, args.output, args.model, overwrite=args.force, **kwargs)
    what = f'dropped {dropped} auxiliary BN tensors' if dropped else 'no auxiliary BN tensors found (already plain)'
    print(f'{out}: {kept} tensors for {args.model}, {what}; loads strictly into timm.create_model({args.model!r})')
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_model, inference_model

    kwargs = {} if args.num_classes is None else {'num_classes': args.num_classes}
    model, size = inference_model(args.model, checkpoint=args.checkpoint, input_size=args.input_size, **kwargs)
    diff = export_model(model, args.output, size, format=args.format, overwrite=args.force, atol=args.atol)
    check = 'onnxruntime' if args.format == 'onnx' else 'the reloaded TorchScript module'
    print(f'{args.output}: {args.model} folded and BN-fused, static padding for {"x".join(map(str, size))}, '
          f'dynamic batch; {check} vs PyTorch max abs diff {diff:.2e}')
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .eval_cli import eval_command
    return eval_command(args)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
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
    p.add_argument('--num-classes', type=int, default=None, help='classifier size, if not the model default')
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
    p.add_argument('--num-classes', type=int, default=None, help='classifier size, if not the model default')
    p.add_argument('--atol', type=float, default=1e-4, help='max abs difference to PyTorch allowed (default 1e-4)')
    p.add_argument('--force', action='store_true', help='replace the output if it exists')
    p.set_defaults(func=_cmd_export)

    from .eval_cli import DESCRIPTION, add_eval_arguments
    p = sub.add_parser('eval', help='ImageNet top-1/5, robust accuracy, ImageNet-C mCE, ImageNet-A, Stylized; '
                       '--compare results', description=DESCRIPTION)
    add_eval_arguments(p)
    p.set_defaults(func=_cmd_eval)

    # the train loop lives in the separate advprop_zoo_train package; its own parser owns the flags
    sub.add_parser('train', add_help=False, help='train / fine-tune with AdvProp; with no flags, the embedded demo '
                   '(see advprop-zoo train --help)')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ['train']:
        from advprop_zoo_train import main as train_main
        return train_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    import advprop_zoo  # noqa: F401  registers the models before any command looks them up
    from .names import UnknownModelError
    from .export import ExportError
    from .weights import WeightsError
    try:
        return args.func(args)
    except (UnknownModelError, WeightsError, FileNotFoundError, ValueError, ExportError) as e:
        print(f'advprop-zoo {args.command}: error: {e}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
