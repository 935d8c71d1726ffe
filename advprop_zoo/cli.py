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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(
        prog='advprop-zoo',
        description='AdvProp EfficientNets for timm: list the zoo, and (in later commands) fold, export, train, eval.')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    p = sub.add_parser('list', help='table of the nine AdvProp models: params, input, crop, attacker, top-1, cache')
    p.set_defaults(func=_cmd_list)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, 'func', None):
        parser.print_help()
        return 2
    import advprop_zoo  # noqa: F401  registers the models before any command looks them up
    from .names import UnknownModelError
    from .weights import WeightsError
    try:
        return args.func(args)
    except (UnknownModelError, WeightsError, FileNotFoundError, ValueError) as e:
        print(f'advprop-zoo {args.command}: error: {e}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
