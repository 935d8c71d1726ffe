"""``advprop-zoo train``: the AdvProp train loop, built from timm's parts.

Data (``create_dataset``/``create_loader``), optimizer (``create_optimizer_v2``), schedule
(``create_scheduler_v2``), EMA (``ModelEmaV3``) and label smoothing are timm's; what this adds is the
step (``advprop_zoo.modes.forward_loss``: vanilla, advprop, adv-train, fast-advprop), the dual BNs it
needs, and folding them away at the end so the saved weights load into the plain timm model.
"""
import argparse
import copy
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

__all__ = ['build_parser', 'train', 'main', 'TrainingError', 'TrainResult']


class TrainingError(RuntimeError):
    """A run that had to stop (non-finite loss, bad configuration), with the step and what is intact."""


@dataclass
class TrainResult:
    """What a run leaves: its summary (as in ``summary.json``), the folded plain model, and the
    validation loader and data config it was evaluated with."""
    summary: Dict[str, Any]
    model: torch.nn.Module
    val_loader: Any
    data_config: Dict[str, Any]


def build_parser() -> argparse.ArgumentParser:
    from advprop_zoo.modes import MODES
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
    g.add_argument('--attack-steps', type=int, default=None, help='default: eps + 1 (1 for eps 1), the paper\'s rule')
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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass
    torch.manual_seed(seed)


def _attack_config(args, model_name: str):
    from advprop_zoo.attacks import AttackConfig
    from advprop_zoo.efficientnet_advprop import VARIANTS
    eps, steps, size = args.attack_eps, args.attack_steps, args.attack_step_size
    if eps is None and model_name.split('.')[0] in {v.name for v in VARIANTS}:
        paper = AttackConfig.from_paper(model_name)
        eps, steps, size = paper.eps, steps or paper.steps, size or paper.step_size
    return AttackConfig(kind=args.attack, eps=1.0 if eps is None else eps, steps=steps, step_size=size,
                        targeted=not args.untargeted, random_start=False if args.no_random_start else None)


def _output_dir(args) -> Path:
    if args.output:
        out = Path(args.output)
    else:
        stamp = time.strftime('%Y%m%d-%H%M%S')
        out = Path('output') / 'train' / f'{stamp}-{args.model.replace("/", "_")}-{args.mode}'
    out.mkdir(parents=True, exist_ok=True)
    return out


def train(args: argparse.Namespace) -> TrainResult:
    """Run one training job described by parsed ``args``, in this process or as one rank of a torchrun
    job. Raises TrainingError / CheckpointError / DataError / ValueError on bad input, before anything
    long starts where it can."""
    import timm
    from timm.data import resolve_data_config
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    import advprop_zoo  # noqa: F401  registers the zoo
    from advprop_zoo.dual_bn import convert_sync_dual_bn, to_dual_bn
    from advprop_zoo.fold import fold_dual_bn
    from advprop_zoo.malloc import keep_freed_memory
    from advprop_zoo.modes import ModeConfig, forward_loss
    from advprop_zoo.names import check_model_name
    from advprop_zoo.weights import save_weights

    from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, \
        set_rng_state
    from .data import create_loaders, digits_folder, resolve_splits
    from .distributed import all_reduce_sum, init_distributed
    from .logs import RunLog

    if args.data_dir is None:
        args.data_dir = str(digits_folder())
        args.model = args.model or 'test_efficientnet'
    args.model = args.model or 'efficientnet_b0_advprop'
    args.mode = args.mode or 'advprop'
    check_model_name(args.model)
    if args.batch_size < 1 or args.epochs < 1:
        raise ValueError('--batch-size and --epochs must be >= 1')
    if args.resume == 'auto' and not args.output:
        raise ValueError('--resume auto needs --output: the run folder to look for checkpoints in')
    attack_cfg = _attack_config(args, args.model)
    mode = ModeConfig(mode=args.mode, attack=attack_cfg, adv_weight=args.adv_weight,
                      clean_weight=args.clean_weight, p_adv=args.p_adv, split_bn=args.split_bn,
                      attack_bn_mode=args.attack_bn_mode)
    _, _, classes = resolve_splits(args.data_dir)  # fail on a bad folder before building anything
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, None: None}[args.amp]
    dist_info = init_distributed(args.device, timeout_s=args.dist_timeout)
    device, primary = dist_info.device, dist_info.primary
    if device.type == 'cpu' and args.cpu_malloc == 'reuse':
        keep_freed_memory()  # an AdvProp step allocates its activations three times: most of it page faults
    _seed_everything(args.seed)

    model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes or len(classes),
                              drop_rate=args.drop, drop_path_rate=args.drop_path)
    overrides = {k: v for k, v in dict(input_size=args.input_size, mean=args.mean, std=args.std).items() if v}
    data_config = resolve_data_config(overrides, model=model)
    if mode.needs_dual_bn:
        model = to_dual_bn(model)
    if dist_info.distributed and not args.no_sync_bn:
        model = convert_sync_dual_bn(model)  # clean and adversarial statistics each reduced over all ranks
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    train_loader, val_loader, _ = create_loaders(args, data_config, dist_info.rank, dist_info.world_size)
    sampler = train_loader.sampler
    steps_per_epoch = sampler.steps_per_epoch

    global_batch = args.batch_size * dist_info.world_size
    lr = args.lr if args.lr is not None else args.lr_base * global_batch / 256
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, **({'eps': args.opt_eps} if 'rmsprop' in args.opt else {}))
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_rate=args.decay_rate, warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr, min_lr=args.min_lr,
        step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    ema = ModelEmaV3(model, decay=args.model_ema_decay, device=device) if args.model_ema else None
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    criterion = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else torch.nn.CrossEntropyLoss()

    out = _output_dir(args) if primary else Path(args.output or '.')
    ckpt_dir = out / 'checkpoints'
    identity = {'model': args.model, 'mode': args.mode, 'num_classes': model.num_classes,
                'batch_size': args.batch_size, 'world_size': dist_info.world_size, 'seed': args.seed}
    log = RunLog(out, enabled=primary)
    num_updates, start_epoch, start_batch = 0, 0, 0
    resume_from = latest_checkpoint(ckpt_dir) if args.resume == 'auto' else (
        Path(args.resume) if args.resume else None)
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from, identity, model)  # verified before anything is touched
        model.load_state_dict(ckpt['model'])
        state = ckpt['state']
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        if scaler is not None and state.get('scaler'):
            scaler.load_state_dict(state['scaler'])
        if ema is not None:
            if ckpt['ema'] is None:
                raise CheckpointError(f'{resume_from}: has no EMA weights but this run keeps an EMA (--model-ema)')
            ema.module.load_state_dict(ckpt['ema'])
        num_updates, start_epoch, start_batch = state['step'], state['epoch'], state['batch']
        set_rng_state(state['rng'][dist_info.rank] if isinstance(state['rng'], list) else state['rng'])
        log.restore(state['log'])
        if primary:
            print(f'resumed from {resume_from} at step {num_updates} (epoch {start_epoch + 1}, batch {start_batch})')
    if primary:
        (out / 'args.json').write_text(json.dumps(vars(args), indent=2, default=str))

    train_model = model
    if dist_info.distributed:
        from torch.nn.parallel import DistributedDataParallel
        import inspect
        # with synchronised BNs every rank holds the same statistics: no per-forward buffer broadcast
        sync_kw = 'forward_sync_buffers' if 'forward_sync_buffers' in inspect.signature(
            DistributedDataParallel.__init__).parameters else 'broadcast_buffers'  # torch < 2.14 spelling
        # Fast AdvProp's clean pass back-propagates outside DDP (see forward_loss): the main BNs are then
        # not in the graph DDP sees, and finding them unused is what makes DDP all-reduce the gradients
        # that pass left in their param.grad
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None,
            find_unused_parameters=args.mode == 'fast-advprop', **{sync_kw: args.no_sync_bn})
    compiled = (lambda m: torch.compile(m, backend=args.compile_backend)) if args.compile else (lambda m: m)
    step_model = compiled(train_model)
    # DDP must only see training passes: under DDP the attack runs the unwrapped module
    attack_model = compiled(model) if dist_info.distributed else step_model
    mean, std = data_config['mean'], data_config['std']
    start = time.perf_counter()
    progress = primary and not args.no_progress
    last_ckpt: Optional[Path] = resume_from

    def checkpoint(epoch: int, batch: int) -> Optional[Path]:
        state = {'step': num_updates, 'epoch': epoch, 'batch': batch, 'optimizer': optimizer.state_dict(),
                 'scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict() if scaler else None,
                 'rng': _gather_rng(rng_state(), dist_info), 'log': log.rows}
        if not primary:
            return None
        return save_checkpoint(ckpt_dir, num_updates, model.state_dict(), state, identity,
                               ema_state=ema.module.state_dict() if ema is not None else None,
                               keep=args.keep_checkpoints)

    stop = False
    for epoch in range(start_epoch, num_epochs):
        model.train()
        sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
        sums = [0.0, 0.0, 0.0, 0.0]  # loss, clean, adv, images (this rank)
        t0 = time.perf_counter()
        batches = train_loader
        if progress:
            from tqdm import tqdm
            batches = tqdm(train_loader, desc=f'{args.mode} epoch {epoch + 1}/{num_epochs}', unit='batch',
                           leave=False, dynamic_ncols=True)
        batch_index = sampler.start
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            losses = forward_loss(step_model, x, y, criterion, mode, mean, std, autocast_dtype=amp_dtype,
                                  grad_scale=scaler.get_scale() if scaler else 1.0, attack_model=attack_model)
            if not torch.isfinite(losses.loss):
                raise TrainingError(_nan_message('loss', losses.loss.item(), epoch, num_updates, last_ckpt))
            if scaler is not None:
                scaler.scale(losses.loss).backward()
                scaler.unscale_(optimizer)
            else:
                losses.loss.backward()
            grad_norm = _grad_norm(model, args.clip_grad)
            if scaler is None and not torch.isfinite(grad_norm):
                raise TrainingError(_nan_message('gradient norm', grad_norm.item(), epoch, num_updates, last_ckpt))
            if scaler is not None:
                scaler.step(optimizer)  # skips the update when fp16 gradients overflowed
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            batch_index += 1
            if ema is not None:
                ema.update(model, step=num_updates)
            scheduler.step_update(num_updates=num_updates)
            n = len(x)
            sums[0] += losses.loss.item() * n
            sums[1] += losses.clean.item() * n
            sums[2] += (losses.adv.item() if losses.adv is not None else 0.0) * n
            sums[3] += n
            if progress:
                post = {'img/s': f'{sums[3] * dist_info.world_size / (time.perf_counter() - t0):.0f}',
                        'clean': f'{losses.clean.item():.3f}'}
                if losses.adv is not None:
                    post['adv'] = f'{losses.adv.item():.3f}'
                batches.set_postfix(post)
            if args.max_steps and num_updates >= args.max_steps:
                stop = True
            if (args.checkpoint_every and num_updates % args.checkpoint_every == 0) or stop:
                last_ckpt = checkpoint(epoch, batch_index) or last_ckpt
            if stop:
                break
        if stop and batch_index < steps_per_epoch:
            break  # stopped mid-epoch by --max-steps: the checkpoint above resumes here
        scheduler.step(epoch + 1)
        loss, clean, adv, seen = all_reduce_sum(sums, dist_info)
        metrics = _evaluate(model, val_loader, mean, std, device, amp_dtype, args.channels_last, dist_info)
        row = {'epoch': epoch + 1, 'step': num_updates, 'lr': optimizer.param_groups[0]['lr'],
               'train_loss': loss / seen, 'clean_loss': clean / seen,
               'adv_loss': adv / seen if args.mode != 'vanilla' else None,
               'val_top1': metrics['top1'], 'images_per_s': seen / (time.perf_counter() - t0)}
        log.append(row)
        if progress:
            print(f'{args.mode} epoch {epoch + 1}/{num_epochs}: loss {row["train_loss"]:.4f} '
                  f'val top-1 {row["val_top1"]:.2f}% ({row["images_per_s"]:.0f} img/s)')
        last_ckpt = checkpoint(epoch + 1, 0) or last_ckpt
        if stop:
            break

    plain = fold_dual_bn(copy.deepcopy(model)) if mode.needs_dual_bn else copy.deepcopy(model)
    finished = not stop or num_updates >= num_epochs * steps_per_epoch
    summary = {'model': args.model, 'mode': args.mode, 'attack': str(attack_cfg), 'epochs': num_epochs,
               'steps': num_updates, 'finished': finished, 'world_size': dist_info.world_size,
               'train_seconds': time.perf_counter() - start,
               'val_top1': log.rows[-1]['val_top1'] if log.rows else None, 'output': str(out),
               'last_checkpoint': str(last_ckpt) if last_ckpt else None,
               'data_config': {k: data_config[k] for k in ('input_size', 'mean', 'std', 'interpolation', 'crop_pct')}}
    if primary and finished:
        meta = {'format': 'pt', 'model': args.model, 'mode': args.mode, 'attack': str(attack_cfg),
                'epochs': str(num_epochs), 'advprop_zoo': advprop_zoo.__version__}
        summary['weights'] = str(save_weights(plain.state_dict(), out / 'model.safetensors', metadata=meta))
        if ema is not None:
            ema_plain = fold_dual_bn(copy.deepcopy(ema.module)) if mode.needs_dual_bn else ema.module
            save_weights(ema_plain.state_dict(), out / 'model_ema.safetensors',
                         metadata={**meta, 'ema': 'true'})
        summary['plot'] = log.plot(title=f'{args.model} {args.mode}')
        log.write_summary(summary)
    return TrainResult(summary, plain, val_loader, data_config)


def _grad_norm(model: torch.nn.Module, clip: Optional[float]) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    if clip:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())


def _gather_rng(state: Dict[str, Any], info) -> Any:
    """Every rank's RNG state (a list indexed by rank) in a distributed run, this process's otherwise."""
    if not info.distributed:
        return state
    import torch.distributed as dist
    states = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states


def _nan_message(what: str, value: float, epoch: int, step: int, last_ckpt: Optional[Path]) -> str:
    where = f'last good checkpoint: {last_ckpt}' if last_ckpt else 'no checkpoint was written yet'
    return (f'non-finite {what} ({value}) at epoch {epoch + 1}, step {step + 1}; stopped before the update '
            f'({where}; resume from it with --resume, perhaps with a lower --lr or --clip-grad)')


def _evaluate(model, loader, mean, std, device, amp_dtype, channels_last, dist_info):
    """Clean validation top-1 / top-5, summed over ranks (timm's eval sampler pads the last shard)."""
    from advprop_zoo.evaluate import evaluate_accuracy
    from .distributed import all_reduce_sum
    m = evaluate_accuracy(model, loader, mean, std, device=device, autocast_dtype=amp_dtype,
                          channels_last=channels_last)
    c1, c5, n = all_reduce_sum([m['top1'] * m['images'] / 100, m['top5'] * m['images'] / 100, m['images']],
                               dist_info)
    return {'top1': 100 * c1 / n, 'top5': 100 * c5 / n, 'images': n}


def main(argv: Optional[List[str]] = None) -> int:
    import sys
    argv = sys.argv[1:] if argv is None else argv
    from advprop_zoo.names import UnknownModelError
    from advprop_zoo.weights import WeightsError
    from .data import DataError
    try:
        args = build_parser().parse_args(argv)
        if args.data_dir is None:  # the embedded demo; the user's flags override its defaults
            from .embedded import run_embedded
            return run_embedded(argv)
        summary = train(args).summary
        if 'weights' in summary:  # the primary rank of a finished run
            print(f'done: val top-1 {summary["val_top1"]:.2f}%, weights {summary["weights"]}, curves {summary["plot"]}')
        elif not summary['finished'] and int(os.environ.get('RANK', '0')) == 0:
            print(f'stopped at step {summary["steps"]}; resume with --resume {summary["last_checkpoint"]}')
        return 0
    except (TrainingError, DataError, UnknownModelError, WeightsError, ValueError) as e:
        print(f'advprop-zoo train: error: {e}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    raise SystemExit(main())
