"""The ``advprop-zoo train`` flags: one argparse parser, shared by the train loop and the embedded demo
(whose defaults are the same flags given first, so the user's own override them)."""
import argparse

from advprop_zoo.attacks import PAPER_STEPS_RULE
from advprop_zoo.modes import MODES

__all__ = ['build_parser']


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='advprop-zoo train',
        description='Train or fine-tune with AdvProp (or vanilla / adversarial training / Fast AdvProp) on an '
                    'ImageFolder dataset. With no arguments at all: the embedded demo, which trains a small '
                    'EfficientNet on scikit-learn\'s digits in vanilla, advprop and adv-train modes and prints '
                    'clean, PGD and corruption accuracy (no download).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('data')
    g.add_argument('--data-dir', default=None,
                   help='folder with train/ and val/ in ImageFolder layout; default: the embedded digits dataset')
    g.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                   help='input size; default: the model\'s pretrained config')
    g.add_argument('--mean', type=float, nargs='+', default=None, help='default: the model\'s config')
    g.add_argument('--std', type=float, nargs='+', default=None, help='default: the model\'s config')
    g.add_argument('--aa', default=None, help='timm AutoAugment / RandAugment policy, e.g. rand-m9-mstd0.5')
    g.add_argument('--scale', type=float, nargs=2, default=(0.08, 1.0), help='random-resized-crop scale range')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--reprob', type=float, default=0.0, help='random erasing probability')
    g.add_argument('--workers', type=int, default=2, help='data loader worker processes')
    g.add_argument('--strict-images', action='store_true',
                   help='stop with an error naming the first unreadable image (a truncated file, a non-image under '
                        'an image name) in train/ or val/; by default each is left out of its batches and named in '
                        'one warning, and the training ones skipped are counted in the epoch line and summary.json')
    g = p.add_argument_group('model')
    g.add_argument('--model', default=None,
                   help='timm model name; default: efficientnet_b0_advprop, or test_efficientnet on the digits')
    g.add_argument('--pretrained', action='store_true', help='start from the model\'s pretrained weights')
    g.add_argument('--num-classes', type=int, default=None, help='default: the number of class folders')
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
    g.add_argument('--untargeted', action='store_true', help='untargeted attack (default: random wrong target)')
    g.add_argument('--no-random-start', action='store_true', help='start the attack at the clean image')
    g.add_argument('--adv-weight', type=float, default=1.0, help='advprop: loss = clean + w * adversarial')
    g.add_argument('--clean-weight', type=float, default=0.5,
                   help='adv-train: a in a*J(x) + (1-a)*J(x_adv); 0 is Madry\'s adversarial-only training')
    g.add_argument('--p-adv', type=float, default=0.2, help='fast-advprop: fraction of each batch attacked')
    g.add_argument('--split-bn', action='store_true',
                   help='advprop: one split-BN pass over [clean; adv] instead of two passes (same update; two '
                        'passes measured faster on CPU, try this on GPU)')
    g.add_argument('--attack-bn-mode', default='train', choices=('train', 'eval'),
                   help='BN statistics the attack uses: batch (running stats frozen) or running')
    g = p.add_argument_group('optimisation (defaults: the TF EfficientNet recipe)')
    g.add_argument('--epochs', type=int, default=350)
    g.add_argument('--batch-size', '-b', type=int, default=64)
    g.add_argument('--eval-batch-size', type=int, default=None)
    g.add_argument('--opt', default='rmsproptf', help='timm optimizer name (rmsproptf = TF RMSProp)')
    g.add_argument('--lr', type=float, default=None, help='default: --lr-base * batch / 256')
    g.add_argument('--lr-base', type=float, default=0.016)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--opt-eps', type=float, default=1e-3)
    g.add_argument('--weight-decay', type=float, default=1e-5)
    g.add_argument('--sched', default='step', help='timm scheduler name')
    g.add_argument('--decay-epochs', type=float, default=2.4)
    g.add_argument('--decay-rate', type=float, default=0.97)
    g.add_argument('--warmup-epochs', type=int, default=5)
    g.add_argument('--warmup-lr', type=float, default=1e-6)
    g.add_argument('--min-lr', type=float, default=0.0)
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights (timm ModelEmaV3)')
    g.add_argument('--model-ema-decay', type=float, default=0.9999)
    g.add_argument('--clip-grad', type=float, default=None, help='clip the gradient norm to this value')
    g = p.add_argument_group('hardware')
    g.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N')
    g.add_argument('--amp', default=None, choices=('bf16', 'fp16'), help='autocast dtype (fp16 adds a GradScaler)')
    g.add_argument('--channels-last', action='store_true', help='NHWC memory format')
    g.add_argument('--compile', action='store_true', help='torch.compile the train step and the attack')
    g.add_argument('--compile-backend', default='inductor', help='torch.compile backend')
    g.add_argument('--cpu-malloc', default='reuse', choices=('reuse', 'default'),
                   help="on CPU, 'reuse' keeps freed activation memory in the process instead of page-faulting it "
                        "in again every pass (glibc; advprop_zoo.malloc); 'default' leaves malloc as it is")
    g = p.add_argument_group('run')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--seeds', type=int, default=1, help='embedded demo: repeat with seeds --seed ... --seed + N - 1 '
                   'and report mean ± std')
    g.add_argument('--output', default=None, help='run folder; default output/train/<time>-<model>-<mode>')
    g.add_argument('--eval-attack-eps', type=float, default=None,
                   help='PGD budget (pixel units) for the final robust accuracy; default: the training eps')
    g.add_argument('--no-progress', action='store_true', help='no progress bar')
    g = p.add_argument_group('checkpoints and faults')
    g.add_argument('--checkpoint-every', type=int, default=0,
                   help='also checkpoint every N steps (one is always written at each epoch end)')
    g.add_argument('--keep-checkpoints', type=int, default=3, help='keep the newest K checkpoints')
    g.add_argument('--resume', default=None, metavar='PATH|auto',
                   help='resume from a checkpoint folder, or the newest one under --output/checkpoints (auto)')
    g.add_argument('--max-steps', type=int, default=None,
                   help='stop after this many optimizer steps in total (checkpointed; resume continues)')
    g.add_argument('--dist-timeout', type=float, default=600.0,
                   help='seconds a collective may wait before a torchrun job with a dead rank fails')
    g.add_argument('--no-sync-bn', action='store_true', help='torchrun: keep BN statistics per rank')
    return p
