"""The ``advprop-zoo train`` flags: one argparse parser, shared by the train loop and the embedded demo
(whose defaults are the same flags given first, so the user's own override them), and ``parse_args``,
which layers defaults the way timm's train.py does: the parser's, then a ``--recipe`` preset, then a
``-c`` YAML file, then the command line."""
import argparse
from pathlib import Path
from typing import Any, Dict, Sequence

import yaml

from advprop_zoo.attacks import PAPER_STEPS_RULE
from advprop_zoo.modes import MODES

from .recipes import RECIPES, recipe_values

__all__ = ['build_parser', 'parse_args', 'args_yaml']


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='advprop-zoo train',
        description='Train or fine-tune with AdvProp (or vanilla / adversarial training / Fast AdvProp) on any '
                    'dataset timm reads (folder, tar, hfds/, hfids/, wds/, tfds/, torch/), with timm\'s flags. With '
                    'no arguments at all: the embedded demo, which trains a small EfficientNet on scikit-learn\'s digits in vanilla, advprop and adv-train modes and prints '
                    'clean, PGD and corruption accuracy (no download).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('data')
    g.add_argument('--data-dir', default=None, metavar='DIR',
                   help='the dataset\'s root, as timm\'s: for a folder or tar dataset the folder holding the splits '
                        '(train/ and val/ in ImageFolder layout, or train.tar and val.tar); for wds/ the folder of the '
                        'shards (and their _info.json); for hfds/ and hfids/ the datasets cache (a NAME that is a '
                        'folder under it is read from there; hfds/ alone reads it); for torch/ and tfds/ where the '
                        'dataset is kept. With neither --data-dir nor --dataset: the embedded digits dataset')
    g.add_argument('--dataset', default='', metavar='NAME',
                   help='timm\'s dataset name (timm.data.create_dataset): empty for a folder or tar, hfds/NAME '
                        '(Hugging Face datasets, a Hub id or a local dataset folder), hfids/NAME (the same, streamed), '
                        'wds/NAME (webdataset shards), tfds/NAME, torch/NAME (torchvision: cifar10, mnist, folder ...)')
    g.add_argument('--train-split', default='train', metavar='NAME',
                   help='the training split: a subfolder (or .tar) of --data-dir for folders, a split name, or for '
                        'wds/ a split of _info.json or a shard pattern such as "train-{0000..0063}.tar" (optionally '
                        '"|N" samples)')
    g.add_argument('--val-split', default='validation', metavar='NAME',
                   help='the validation split, as --train-split; a folder dataset finds val/ (or valid/, eval/ ...) '
                        'for it, as timm does')
    g.add_argument('--train-num-samples', type=int, default=None, metavar='N',
                   help='samples in the training split, for iterable datasets (wds/, hfids/, tfds/) that cannot tell; '
                        'it sets the steps per epoch')
    g.add_argument('--val-num-samples', type=int, default=None, metavar='N',
                   help='samples in the validation split, for iterable datasets that cannot tell (needed under '
                        'torchrun, where each rank reads its share)')
    g.add_argument('--class-map', default='', metavar='FILENAME',
                   help='class name -> index file (.txt, one name a line), as timm\'s')
    g.add_argument('--input-img-mode', default=None,
                   help='PIL mode images are converted to; default RGB, or L for a 1-channel --input-size')
    g.add_argument('--dataset-download', action='store_true',
                   help='let torch/, tfds/ and hfids/ datasets download what is missing')
    g.add_argument('--input-key', default=None, metavar='KEY',
                   help='image field of hfds/ hfids/ wds/ tfds/ samples (default: the reader\'s, as timm)')
    g.add_argument('--target-key', default=None, metavar='KEY',
                   help='label field of hfds/ hfids/ wds/ tfds/ samples (default: the reader\'s, as timm)')
    g.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                   help='input size; default: the model\'s pretrained config')
    g.add_argument('--mean', type=float, nargs='+', default=None, help='default: the model\'s config')
    g.add_argument('--std', type=float, nargs='+', default=None, help='default: the model\'s config')
    g.add_argument('--aa', default=None, help='timm AutoAugment / RandAugment policy, e.g. rand-m9-mstd0.5')
    g.add_argument('--scale', type=float, nargs=2, default=(0.08, 1.0), help='random-resized-crop scale range')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--reprob', type=float, default=0.0, help='random erasing probability')
    g.add_argument('-j', '--workers', type=int, default=4,
                   help='data loader worker processes (persistent across epochs)')
    g.add_argument('--strict-images', action='store_true',
                   help='stop with an error naming the first unreadable image (a truncated file, a non-image under '
                        'an image name) of a folder, tar or hfds/ dataset; by default each is left out of its batches '
                        'and named in one warning, and the training ones skipped are counted in the epoch line and '
                        'summary.json')
    g = p.add_argument_group('augmentation (timm\'s flags and meanings)')
    g.add_argument('--ratio', type=float, nargs=2, default=(3 / 4, 4 / 3), metavar=('MIN', 'MAX'),
                   help='random-resized-crop aspect ratio range')
    g.add_argument('--vflip', type=float, default=0.0, help='vertical flip probability')
    g.add_argument('--color-jitter', type=float, default=0.4, help='color jitter factor (off under --aa)')
    g.add_argument('--remode', default='pixel', help='random erasing mode (with --reprob > 0)')
    g.add_argument('--recount', type=int, default=1, help='random erasing count')
    g.add_argument('--train-interpolation', default=None,
                   help='training resize interpolation (random, bilinear, bicubic); default: the model\'s own '
                        '(timm\'s default is random)')
    g = p.add_argument_group('model')
    g.add_argument('--model', default=None,
                   help='timm model name; default: efficientnet_b0_advprop, or test_efficientnet on the digits')
    g.add_argument('--pretrained', action='store_true', help='start from the model\'s pretrained weights')
    g.add_argument('--pretrained-path', default=None, metavar='FILE',
                   help='load this file as if it were the pretrained weights (timm\'s meaning: a new head where the '
                        'class count differs)')
    g.add_argument('--initial-checkpoint', default=None, metavar='FILE',
                   help='start from these weights (safetensors, or a timm .pth.tar read weights_only; plain or '
                        'dual-BN; checked to fit strictly)')
    g.add_argument('--num-classes', type=int, default=None,
                   help='default: the dataset\'s own class count (required where the set names no classes)')
    g.add_argument('--drop', type=float, default=None, help='classifier dropout; default: the model\'s')
    g.add_argument('--drop-path', type=float, default=None, help='drop-connect rate; default: the model\'s')
    g = p.add_argument_group('AdvProp')
    g.add_argument('--mode', default=None, choices=MODES,
                   help='training objective (default advprop; the embedded demo runs vanilla, advprop and adv-train)')
    g.add_argument('--attack', default='pgd', choices=('pgd', 'fgsm'), help='attack used while training')
    g.add_argument('--attack-eps', type=float, default=None,
                   help='L-inf budget in 0-255 pixel units; default: the paper\'s for zoo models, else 1')
    g.add_argument('--attack-steps', type=int, default=None, help=f'default: the paper\'s rule, {PAPER_STEPS_RULE}')
    g.add_argument('--attack-step-size', type=float, default=None, help='pixel units; default 1 (FGSM: eps)')
    g.add_argument('--untargeted', action='store_true',
                   help='untargeted attack (default: random wrong target; with mixup/cutmix the attack\'s label is the '
                        'mixed labels\' argmax)')
    g.add_argument('--no-random-start', action='store_true', help='start the attack at the clean image')
    g.add_argument('--adv-weight', type=float, default=1.0, help='advprop: loss = clean + w * adversarial')
    g.add_argument('--clean-weight', type=float, default=0.5,
                   help='adv-train: a in a*J(x) + (1-a)*J(x_adv); 0 is Madry\'s adversarial-only training')
    g.add_argument('--p-adv', type=float, default=0.2, help='fast-advprop: fraction of each batch attacked')
    g.add_argument('--split-bn', action='store_true',
                   help='advprop: one split-BN pass over [clean; adv] instead of two passes (same update; two '
                        'passes measured faster on CPU, try this on GPU). Not timm\'s --split-bn, which splits '
                        'augmentation splits, not clean and adversarial halves')
    g.add_argument('--attack-bn-mode', default='train', choices=('train', 'eval'),
                   help='BN statistics the attack uses: batch (running stats frozen) or running')
    g = p.add_argument_group('optimisation (defaults: the TF EfficientNet recipe; timm\'s spellings and meanings)')
    g.add_argument('--recipe', default=None, choices=tuple(RECIPES),
                   help='a preset: paper = the published ImageNet recipe for the model\'s size (RMSProp-TF, lr 0.016 '
                        'per 256, x0.97 every 2.4 epochs after 5 warm-up, 350 epochs, wd 1e-5, smoothing 0.1, EMA '
                        '0.9999, AutoAugment, dropout and drop-connect by size, the paper\'s attacker); finetune = '
                        'a short cosine transfer recipe from --pretrained / --initial-checkpoint weights. Flags '
                        'given win; the run prints the preset and the overrides')
    g.add_argument('--epochs', type=int, default=350)
    g.add_argument('--batch-size', '-b', type=int, default=64)
    g.add_argument('--validation-batch-size', '-vb', type=int, default=None, help='default: --batch-size')
    g.add_argument('--grad-accum-steps', type=int, default=1,
                   help='optimizer step every N batches (the lr scales with the effective batch)')
    g.add_argument('--opt', default='rmsproptf', help='timm optimizer name (rmsproptf = TF RMSProp)')
    g.add_argument('--lr', type=float, default=None,
                   help='default: --lr-base scaled by the global effective batch / --lr-base-size')
    g.add_argument('--lr-base', type=float, default=0.016)
    g.add_argument('--lr-base-size', type=int, default=256)
    g.add_argument('--lr-base-scale', default='', choices=('', 'linear', 'sqrt'),
                   help='default: sqrt for Ada*/LAMB optimizers, linear otherwise (as timm)')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--opt-eps', type=float, default=None,
                   help='optimizer epsilon, for any optimizer; default 1e-3 for rmsproptf (the TF recipe), else '
                        'the optimizer\'s own')
    g.add_argument('--opt-betas', type=float, nargs='+', default=None, help='optimizer betas, for any that has them')
    g.add_argument('--weight-decay', type=float, default=1e-5)
    g.add_argument('--sched', default='step', help='timm scheduler name')
    g.add_argument('--decay-epochs', type=float, default=2.4)
    g.add_argument('--decay-rate', type=float, default=0.97)
    g.add_argument('--warmup-epochs', type=int, default=5)
    g.add_argument('--warmup-lr', type=float, default=1e-6)
    g.add_argument('--min-lr', type=float, default=0.0)
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--mixup', type=float, default=0.0, help='mixup alpha, on when > 0')
    g.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha, on when > 0')
    g.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixup or cutmix per batch')
    g.add_argument('--mixup-switch-prob', type=float, default=0.5,
                   help='probability of cutmix instead of mixup when both are on')
    g.add_argument('--mixup-off-epoch', type=int, default=0, help='turn mixup/cutmix off from this epoch (0: never)')
    g.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights (timm ModelEmaV3)')
    g.add_argument('--model-ema-decay', type=float, default=0.9999)
    g.add_argument('--clip-grad', type=float, default=None, help='clip the gradient norm to this value')
    g = p.add_argument_group('hardware')
    g.add_argument('--device', default=None, help='cpu, cuda or cuda:N; default: cuda where available, else cpu')
    g.add_argument('--amp', action='store_true', help='mixed precision (autocast) with --amp-dtype')
    g.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'),
                   help='autocast dtype of --amp (float16 adds a GradScaler)')
    g.add_argument('--channels-last', action='store_true', help='NHWC memory format')
    g.add_argument('--torchcompile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                   help='torch.compile the train step and the attack (default backend: inductor)')
    g.add_argument('--torchcompile-mode', default=None, help='torch.compile mode, e.g. max-autotune')
    g.add_argument('--pin-mem', action='store_true', help='pin the loaders\' CPU memory (faster copies to a GPU)')
    g.add_argument('--cpu-malloc', default='reuse', choices=('reuse', 'default'),
                   help="on CPU, 'reuse' keeps freed activation memory in the process instead of page-faulting it "
                        "in again every pass (glibc; advprop_zoo.malloc); 'default' leaves malloc as it is")
    g = p.add_argument_group('run')
    g.add_argument('-c', '--config', default=None, metavar='FILE',
                   help='YAML file of flag defaults, as timm\'s train.py (flags given still win); a run saves its '
                        'resolved flags as args.yaml, so -c RUN/args.yaml repeats it')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--seeds', type=int, default=1, help='embedded demo: repeat with seeds --seed ... --seed + N - 1 '
                   'and report mean ± std')
    g.add_argument('--output', default=None,
                   help='the run folder; with --experiment, the folder run folders go in (timm\'s meaning); default '
                        'output/train/<time>-<model>-<mode>')
    g.add_argument('--experiment', default=None, help='run folder name under --output (default output/train), as timm')
    g.add_argument('--log-interval', type=int, default=50,
                   help='batches between progress lines (plain lines when output is not a terminal)')
    g.add_argument('--log-wandb', action='store_true',
                   help='also log each epoch to Weights & Biases (pip install wandb; WANDB_MODE=offline works)')
    g.add_argument('--eval-metric', default='top1', choices=('top1', 'top5'),
                   help='validation metric that picks model_best.safetensors')
    g.add_argument('--no-progress', action='store_true', help='no progress output')
    g = p.add_argument_group('checkpoints and faults')
    g.add_argument('--checkpoint-every', type=int, default=0,
                   help='also checkpoint every N steps (one is always written at each epoch end)')
    g.add_argument('--checkpoint-hist', type=int, default=3, help='keep the newest N checkpoints')
    g.add_argument('--resume', default=None, metavar='PATH|auto',
                   help='resume from a checkpoint folder, or (auto) the newest one in the run folder that verifies; '
                        'flags given differently from the checkpoint\'s run override its saved settings')
    g.add_argument('--max-steps', type=int, default=None,
                   help='stop after this many optimizer steps in total (checkpointed; resume continues)')
    g.add_argument('--dist-timeout', type=float, default=600.0,
                   help='seconds a collective may wait before a torchrun job with a dead or hung rank fails (rank 0 '
                        'names it); a rank with no batch finished in twice this exits by itself')
    g.add_argument('--no-sync-bn', action='store_true', help='torchrun: keep BN statistics per rank')
    return p


def _check_value(action: argparse.Action, value: Any, path: Path) -> Any:
    """A config file's value for ``action``, checked the way the command line would check it."""
    flag = action.option_strings[-1] if action.option_strings else action.dest
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f'{path}: {action.dest}: {value!r} is not true/false ({flag} is a switch)')
        return value
    if value is None:
        return value
    many = action.nargs not in (None, '?')
    items = value if many and isinstance(value, (list, tuple)) else [value]
    if many and not isinstance(value, (list, tuple)):
        raise ValueError(f'{path}: {action.dest}: {value!r} is not a list ({flag} takes several values)')
    out = []
    for item in items:
        if isinstance(item, (list, dict)) or (action.type in (int, float) and isinstance(item, bool)):
            raise ValueError(f'{path}: {action.dest}: {item!r} is not a {getattr(action.type, "__name__", "value")}')
        try:
            item = action.type(item) if action.type is not None else item
        except (TypeError, ValueError):
            raise ValueError(f'{path}: {action.dest}: {item!r} is not a {action.type.__name__} ({flag})') from None
        if action.choices is not None and item not in action.choices:
            raise ValueError(f'{path}: {action.dest}: {item!r} is not one of {", ".join(map(str, action.choices))}')
        out.append(item)
    return out if many else out[0]


def load_config(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """Flag defaults from a YAML file of ``dest: value`` (timm's ``-c``); an unknown key or a value of the
    wrong type is a one-line error naming the file and the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ValueError(f'{path}: no such config file') from None
    except yaml.YAMLError as e:
        raise ValueError(f'{path}: not valid YAML ({" ".join(str(e).split())})') from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f'{path}: a config file holds "flag_name: value" lines, not a {type(data).__name__}')
    actions = {a.dest: a for a in parser._actions if a.dest != 'help'}
    out = {}
    for key, value in data.items():
        dest = str(key).replace('-', '_')
        if dest not in actions:
            raise ValueError(f'{path}: unknown key {key!r} (not a flag of advprop-zoo train)')
        out[dest] = _check_value(actions[dest], value, path)
    return out


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv`` over the defaults of ``--recipe`` (from the command line or the config) and of ``-c``,
    in that order: what is given on the command line always wins."""
    parser = build_parser()
    argv = list(argv)
    first = parser.parse_args(argv)
    config = load_config(first.config, parser) if first.config else {}
    parser.set_defaults(**config)
    chosen = parser.parse_args(argv)
    preset = recipe_values(chosen.recipe, chosen.model or 'efficientnet_b0_advprop')
    if preset:
        parser.set_defaults(**{**preset, **config})
        chosen = parser.parse_args(argv)
    return chosen


def args_yaml(args: argparse.Namespace) -> str:
    """The resolved flags as YAML, for ``args.yaml`` in the run folder (``-c`` reads it back)."""
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}
    return yaml.safe_dump(plain, default_flow_style=False, sort_keys=True)
