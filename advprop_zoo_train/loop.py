"""The AdvProp train loop, split as timm's train.py is: setup, ``train_one_epoch``, ``validate``, ``train``.

Data (``create_dataset``/``create_loader``), optimizer (``create_optimizer_v2``), schedule
(``create_scheduler_v2``), EMA (``ModelEmaV3``) and label smoothing are timm's; what this adds is the
step (``advprop_zoo.modes.forward_loss``: vanilla, advprop, adv-train, fast-advprop), the dual BNs it
needs, checkpoints a resume continues bit-exactly, and folding the dual BNs away at the end so the
saved weights load into the plain timm model.
"""
import argparse
import contextlib
import copy
import inspect
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from timm.data import resolve_data_config
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad, random_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import advprop_zoo.modes as modes  # modes.forward_loss is looked up at each step: tests patch it there
from advprop_zoo.attacks import AttackConfig
from advprop_zoo.dual_bn import convert_sync_dual_bn, is_dual_bn, to_dual_bn
from advprop_zoo.efficientnet_advprop import VARIANTS, paper_attacker
from advprop_zoo.errors import AdvPropZooError
from advprop_zoo.eval.accuracy import evaluate_accuracy
from advprop_zoo.fold import fold_dual_bn
from advprop_zoo.load import load_model
from advprop_zoo.malloc import keep_freed_memory
from advprop_zoo.names import check_model_name
from advprop_zoo.version import __version__
from advprop_zoo.weights import atomic_write, save_weights

from .args import args_yaml
from .checkpoint import (
    CheckpointError, find_resumable, load_checkpoint, mark_diverged, rng_state, save_checkpoint, set_rng_state,
    verify_checkpoint,
)
from .data import create_loaders, digits_folder, resolve_splits
from .distributed import DistInfo, StepWatchdog, all_gather, all_reduce_sum, collective_failure, init_distributed
from .logs import Progress, RunLog, start_wandb
from .recipes import describe as describe_recipe

__all__ = ['TrainingError', 'TrainResult', 'TrainState', 'setup', 'train_one_epoch', 'validate', 'train']

_AMP_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}
_NEVER = 2 ** 62  # TrainState.bad_at while no non-finite value was seen (reduced with MIN over ranks)
# flags a checkpoint's optimizer and schedule state were built from: given differently on --resume, they win
OPTIMIZER_FLAGS = ('opt', 'lr', 'lr_base', 'lr_base_size', 'lr_base_scale', 'grad_accum_steps', 'momentum', 'opt_eps',
                   'opt_betas', 'weight_decay')
SCHEDULE_FLAGS = ('sched', 'epochs', 'decay_epochs', 'decay_rate', 'warmup_epochs', 'warmup_lr', 'min_lr')
# flags read afresh every step (or when the model is built): reported when they differ, nothing to override
STEP_FLAGS = ('clip_grad', 'smoothing', 'adv_weight', 'clean_weight', 'p_adv', 'attack', 'attack_eps', 'attack_steps',
              'attack_step_size', 'untargeted', 'no_random_start', 'attack_bn_mode', 'drop', 'drop_path',
              'model_ema_decay', 'mixup', 'cutmix', 'mixup_prob', 'mixup_switch_prob', 'mixup_off_epoch')


class TrainingError(AdvPropZooError, RuntimeError):
    """A run that had to stop (non-finite loss, bad configuration), with the step and what is intact."""


@dataclass
class TrainResult:
    """What a run leaves: its summary (as in ``summary.json``), the folded plain model, and the
    validation loader and data config it was evaluated with."""
    summary: Dict[str, Any]
    model: torch.nn.Module
    val_loader: Any
    data_config: Dict[str, Any]


@dataclass
class TrainState:
    """One run's parts and its position in the run: what timm's train.py keeps as locals of main(),
    gathered so that train_one_epoch, validation and checkpoints can share them."""
    args: argparse.Namespace
    dist: DistInfo
    mode: modes.ModeConfig
    model: nn.Module  # the training model (dual BNs where the mode needs them): checkpointed, folded at the end
    step_model: nn.Module  # what the step trains through: the model, DDP-wrapped and / or compiled
    attack_model: nn.Module  # what the attack runs through: DDP must only see training passes
    data_config: Dict[str, Any]
    train_loader: Any
    val_loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    num_epochs: int
    criterion: nn.Module
    mixup: Optional[Mixup]  # timm's mixup / cutmix, when --mixup or --cutmix is on
    ema: Optional[ModelEmaV3]
    scaler: Optional[torch.amp.GradScaler]
    amp_dtype: Optional[torch.dtype]
    out: Path
    identity: Dict[str, Any]  # stored in every checkpoint, checked on resume
    log: RunLog
    num_updates: int = 0
    start_epoch: int = 0
    start_batch: int = 0
    last_ckpt: Optional[Path] = None  # the newest checkpoint whose weights gave a finite loss afterwards
    unproven_ckpt: Optional[Path] = None  # written by this run, its weights not yet through a finite loss
    stop: bool = False  # --max-steps reached
    best: Optional[Dict[str, Any]] = None  # the epoch with the best --eval-metric so far
    # on the device, read only at a check (log interval, checkpoint, epoch end): the first step whose loss
    # [0] or gradient norm [1] was non-finite, _NEVER while none was; a step never waits for the device
    bad_at: Optional[torch.Tensor] = None
    watchdog: Optional[StepWatchdog] = None  # distributed runs: ends this rank when it hangs between batches

    @property
    def progress(self) -> bool:
        return self.dist.primary and not self.args.no_progress


def _attack_config(args: argparse.Namespace, model_name: str) -> AttackConfig:
    """The training attack from the flags; for a zoo model without ``--attack-eps``, the paper's."""
    eps, steps, size = args.attack_eps, args.attack_steps, args.attack_step_size
    if eps is None and model_name.split('.')[0] in {v.name for v in VARIANTS}:
        paper = paper_attacker(model_name).config()
        eps, steps, size = paper.eps, steps or paper.steps, size or paper.step_size
    return AttackConfig(kind=args.attack, eps=1.0 if eps is None else eps, steps=steps, step_size=size,
                        targeted=not args.untargeted, random_start=False if args.no_random_start else None)


def _check_args(args: argparse.Namespace) -> Tuple[modes.ModeConfig, List[str]]:
    """Fill in the defaults that depend on other flags and fail on bad input, before anything is built
    or written. Returns the step's configuration and the class names."""
    if args.data_dir is None and not args.dataset:  # the embedded digits
        args.data_dir = str(digits_folder())
        args.model = args.model or 'test_efficientnet'
    args.model = args.model or 'efficientnet_b0_advprop'
    args.mode = args.mode or 'advprop'
    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')  # timm's default where it can
    check_model_name(args.model)
    if args.batch_size < 1 or args.epochs < 1 or args.grad_accum_steps < 1:
        raise ValueError('--batch-size, --epochs and --grad-accum-steps must be >= 1')
    if args.resume == 'auto' and not (args.output or args.experiment):
        raise ValueError('--resume auto needs --output (or --experiment): the run folder to look for checkpoints in')
    run_dir = _run_dir(args)
    if run_dir is not None and run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f'--output {run_dir}: is a file; name a run folder')
    given = [f for f in ('pretrained', 'pretrained_path', 'initial_checkpoint') if getattr(args, f)]
    if len(given) > 1:
        raise ValueError(f'give one of --pretrained, --pretrained-path, --initial-checkpoint, not {len(given)}')
    if args.recipe == 'finetune' and not given:
        raise ValueError('--recipe finetune starts from pretrained weights: add --pretrained, --pretrained-path or '
                         '--initial-checkpoint')
    if (args.mixup or args.cutmix) and args.batch_size % 2:
        raise ValueError(f'--mixup / --cutmix pair images within a batch: --batch-size must be even, got '
                         f'{args.batch_size}')
    if args.resume not in (None, 'auto'):
        verify_checkpoint(Path(args.resume))  # a damaged or missing checkpoint fails before anything is written
    mode = modes.ModeConfig(mode=args.mode, attack=_attack_config(args, args.model), adv_weight=args.adv_weight,
                            clean_weight=args.clean_weight, p_adv=args.p_adv, split_bn=args.split_bn,
                            attack_bn_mode=args.attack_bn_mode)
    classes = resolve_splits(args)  # the dataset's classes, or --num-classes where it names none
    return mode, classes


def _run_dir(args: argparse.Namespace) -> Optional[Path]:
    """The run folder the flags name: ``--output``, or ``--output/--experiment`` as timm lays runs out;
    None when the name is made at start (a time stamp)."""
    if args.experiment:
        return Path(args.output or Path('output') / 'train') / args.experiment
    return Path(args.output) if args.output else None


def _output_dir(args: argparse.Namespace) -> Path:
    out = _run_dir(args)
    if out is None:
        stamp = time.strftime('%Y%m%d-%H%M%S')
        out = Path('output') / 'train' / f'{stamp}-{args.model.replace("/", "_")}-{args.mode}'
    out.mkdir(parents=True, exist_ok=True)
    return out


def _check_run_dir_free(args: argparse.Namespace, info: DistInfo) -> None:
    """A second run into a folder that holds a run is refused unless it resumes: its log and checkpoints
    would be overwritten or pruned as old ones. Decided on rank 0, raised on every rank."""
    out = _run_dir(args)
    taken = info.primary and out is not None and args.resume is None and any(
        (out / name).exists() for name in ('args.yaml', 'log.csv', 'checkpoints', 'model.safetensors'))
    if all_reduce_sum([float(taken)], info)[0] > 0:
        raise ValueError(f'{out} already holds a run; resume it with --resume auto (or a checkpoint), or choose '
                         'another --output / --experiment')


def _initial_model(args: argparse.Namespace, num_classes: int, mode: modes.ModeConfig) -> nn.Module:
    """The model before training, through ``load_model``: fresh, timm's pretrained weights, a file taken as
    the pretrained weights (``--pretrained-path``: a new head where the class count differs), or a
    checkpoint loaded strictly (``--initial-checkpoint``; a dual-BN one stays dual where the mode is)."""
    kwargs = dict(num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path)
    if args.initial_checkpoint:
        return load_model(args.model, checkpoint=args.initial_checkpoint, fold=not mode.needs_dual_bn,
                          **kwargs).model
    if args.pretrained_path:
        return load_model(args.model, pretrained=True, pretrained_cfg_overlay=dict(file=args.pretrained_path),
                          **kwargs).model
    return load_model(args.model, pretrained=args.pretrained, **kwargs).model


def _create_model(args: argparse.Namespace, num_classes: int, mode: modes.ModeConfig,
                  info: DistInfo) -> Tuple[nn.Module, Dict[str, Any]]:
    """The training model on its device (dual BNs, synchronised under torchrun) and its data config."""
    model = _initial_model(args, num_classes, mode).train()
    overrides = {k: v for k, v in dict(input_size=args.input_size, mean=args.mean, std=args.std).items() if v}
    data_config = resolve_data_config(overrides, model=model)
    if mode.needs_dual_bn and not any(is_dual_bn(m) for m in model.modules()):
        model = to_dual_bn(model)
    if info.distributed and not args.no_sync_bn:
        model = convert_sync_dual_bn(model)  # clean and adversarial statistics each reduced over all ranks
    model.to(info.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, data_config


def resolve_lr(args: argparse.Namespace, world_size: int) -> float:
    """``--lr``, or timm's rule: ``--lr-base`` scaled by the global effective batch (batch x ranks x
    ``--grad-accum-steps``) over ``--lr-base-size``, linearly or (Ada*/LAMB by default) by its square root."""
    if args.lr is not None:
        return args.lr
    ratio = args.batch_size * world_size * args.grad_accum_steps / args.lr_base_size
    scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    return args.lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)


def _create_optimization(args: argparse.Namespace, model: nn.Module, steps_per_epoch: int, info: DistInfo,
                         amp_dtype: Optional[torch.dtype], num_classes: int) -> Dict[str, Any]:
    """timm's optimizer (its kwargs from the flags, ``--opt-eps``/``--opt-betas`` for any optimizer), per-update
    scheduler, EMA, mixup and loss, and the fp16 GradScaler, as TrainState fields."""
    eps = args.opt_eps if args.opt_eps is not None or args.opt != 'rmsproptf' else 1e-3  # the TF recipe's
    opt_args = argparse.Namespace(**{**vars(args), 'lr': resolve_lr(args, info.world_size), 'opt_eps': eps})
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=opt_args))
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_rate=args.decay_rate, warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr, min_lr=args.min_lr,
        step_on_epochs=False, updates_per_epoch=math.ceil(steps_per_epoch / args.grad_accum_steps))
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                  switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing,
                  num_classes=num_classes) if args.mixup > 0 or args.cutmix > 0 else None
    if mixup is not None:  # soft targets, smoothing already in them (as timm's train.py)
        criterion = SoftTargetCrossEntropy()
    else:
        criterion = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss()
    return dict(
        optimizer=optimizer, scheduler=scheduler, num_epochs=num_epochs, mixup=mixup, criterion=criterion,
        ema=ModelEmaV3(model, decay=args.model_ema_decay, device=info.device) if args.model_ema else None,
        scaler=torch.amp.GradScaler(info.device.type) if amp_dtype == torch.float16 else None)


def _wrap_model(model: nn.Module, args: argparse.Namespace, info: DistInfo) -> Tuple[nn.Module, nn.Module]:
    """``(step_model, attack_model)``: DDP for the training passes under torchrun, torch.compile on request."""
    train_model = model
    if info.distributed:
        # with synchronised BNs every rank holds the same statistics: no per-forward buffer broadcast
        sync_kw = 'forward_sync_buffers' if 'forward_sync_buffers' in inspect.signature(
            DistributedDataParallel.__init__).parameters else 'broadcast_buffers'  # torch < 2.14 spelling
        # Fast AdvProp's clean pass back-propagates outside DDP (see forward_loss): the main BNs are then
        # not in the graph DDP sees, and finding them unused is what makes DDP all-reduce the gradients
        # that pass left in their param.grad
        train_model = DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == 'cuda' else None,
            find_unused_parameters=args.mode == 'fast-advprop', **{sync_kw: args.no_sync_bn})
    if info.device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # one input size all run: pick each conv's fastest algorithm once
    # dynamic=False: batches of B (clean) and 2B (split BN) are two static graphs, not one dynamic one
    compiled = (lambda m: torch.compile(m, backend=args.torchcompile, mode=args.torchcompile_mode, dynamic=False)) \
        if args.torchcompile else (lambda m: m)
    step_model = compiled(train_model)
    # DDP must only see training passes: under DDP the attack runs the unwrapped module
    return step_model, compiled(model) if info.distributed else step_model


def _resume_path(args: argparse.Namespace, folder: Path, primary: bool) -> Optional[Path]:
    """The checkpoint ``--resume`` names; for ``auto`` the newest in ``folder`` that verifies (each newer,
    damaged one is skipped with a line saying why), or None on a first start."""
    if args.resume != 'auto':
        return Path(args.resume) if args.resume else None
    path, skipped = find_resumable(folder)
    if primary:
        for bad, why in skipped:
            print(f'--resume auto: skipped {bad.name}, it does not verify: {why}')
    if path is None and skipped:
        raise CheckpointError(f'{folder}: none of its {len(skipped)} checkpoints verifies; newest: {skipped[0][1]}')
    return path


def _flag(name: str) -> str:
    return '--' + name.replace('_', '-')


def _restore_optimization(state: TrainState, saved: Dict[str, Any], path: Path) -> None:
    """Optimizer and schedule state from the checkpoint, except where the flags that built them were
    given differently now: those take effect (fresh hyper-parameters, the schedule placed at the resumed
    step), and one line says which flags override the saved state."""
    before = saved.get('hparams') or {}  # absent in checkpoints written before flags could override
    now = {k: getattr(state.args, k) for k in OPTIMIZER_FLAGS + SCHEDULE_FLAGS + STEP_FLAGS}
    changed = [k for k in now if k in before and before[k] != now[k]]
    fresh_groups = [{k: v for k, v in g.items() if k != 'params'} for g in state.optimizer.param_groups]
    if 'opt' not in changed:
        state.optimizer.load_state_dict(saved['optimizer'])  # per-parameter state (momentum, averages) kept
    if set(changed) & set(OPTIMIZER_FLAGS):
        for group, fresh in zip(state.optimizer.param_groups, fresh_groups):
            group.update(fresh)
    if set(changed) & set(OPTIMIZER_FLAGS + SCHEDULE_FLAGS):
        state.scheduler.step_update(num_updates=saved['step'])  # this run's schedule at the resumed step
    else:
        state.scheduler.load_state_dict(saved['scheduler'])
    if changed and state.dist.primary:
        said = ', '.join(f'{_flag(k)} {now[k]} (was {before[k]})' for k in changed)
        fresh = ' (optimizer state not restored)' if 'opt' in changed else ''
        print(f'resume: {said} override {path.name}\'s saved settings{fresh}')


def _resume(state: TrainState, path: Path) -> None:
    """Load checkpoint ``path`` (verified before anything is touched) into every part of ``state``."""
    ckpt = load_checkpoint(path, state.identity, state.model)
    state.model.load_state_dict(ckpt['model'])
    saved = ckpt['state']
    _restore_optimization(state, saved, path)
    if state.scaler is not None and saved.get('scaler'):
        state.scaler.load_state_dict(saved['scaler'])
    if state.ema is not None:
        if ckpt['ema'] is None:
            raise CheckpointError(f'{path}: has no EMA weights but this run keeps an EMA (--model-ema)')
        state.ema.module.load_state_dict(ckpt['ema'])
    state.num_updates, state.start_epoch, state.start_batch = saved['step'], saved['epoch'], saved['batch']
    set_rng_state(saved['rng'][state.dist.rank] if isinstance(saved['rng'], list) else saved['rng'])
    state.log.restore(saved['log'])
    state.last_ckpt = path
    if state.dist.primary:
        print(f'resumed from {path} at step {state.num_updates} (epoch {state.start_epoch + 1}, '
              f'batch {state.start_batch})')


def setup(args: argparse.Namespace) -> TrainState:
    """Everything a run needs, from parsed ``args``: checked input, process group, seeded model, loaders,
    optimizer, schedule, EMA, the run folder, and the state of ``--resume``'s checkpoint."""
    mode, classes = _check_args(args)  # a bad folder or flag fails here, before anything is built
    amp_dtype = _AMP_DTYPES[args.amp_dtype] if args.amp else None
    info = init_distributed(args.device, timeout_s=args.dist_timeout)
    _check_run_dir_free(args, info)
    if info.device.type == 'cpu' and args.cpu_malloc == 'reuse':
        keep_freed_memory()  # an AdvProp step allocates its activations three times: most of it page faults
    random_seed(args.seed, 0)
    model, data_config = _create_model(args, args.num_classes or len(classes), mode, info)
    train_loader, val_loader, _ = create_loaders(args, data_config, info.rank, info.world_size)
    parts = _create_optimization(args, model, train_loader.steps_per_epoch, info, amp_dtype, model.num_classes)
    out = _output_dir(args) if info.primary else (_run_dir(args) or Path('.'))
    identity = {'model': args.model, 'mode': args.mode, 'num_classes': model.num_classes,
                'batch_size': args.batch_size, 'world_size': info.world_size, 'seed': args.seed}
    state = TrainState(args=args, dist=info, mode=mode, model=model,
                       step_model=model, attack_model=model,  # wrapped below, once a resume has loaded the weights
                       data_config=data_config, train_loader=train_loader, val_loader=val_loader,
                       amp_dtype=amp_dtype, out=out, identity=identity,
                       log=RunLog(out, enabled=info.primary, wandb=args.log_wandb),
                       **parts)
    resume_from = _resume_path(args, out / 'checkpoints', info.primary)
    if resume_from is not None:
        _resume(state, resume_from)
    if info.primary:
        if args.log_wandb:
            start_wandb(args, out)
        with atomic_write(out / 'args.yaml', 'w') as f:  # -c out/args.yaml repeats the run
            f.write(args_yaml(args))
        if (said := describe_recipe(args)):
            print(said)
    state.step_model, state.attack_model = _wrap_model(model, args, info)
    if info.distributed:  # twice the collectives' timeout: the ranks that wait name the hung one first
        state.watchdog = StepWatchdog(2 * args.dist_timeout, info.rank)
    return state


def _checkpoint(state: TrainState, epoch: int, batch: int) -> None:
    """Checkpoint the run at (``epoch``, ``batch``); a collective under torchrun, written by rank 0 only."""
    _check_health(state, epoch)
    _check_finite_weights(state, epoch)
    hparams = {k: getattr(state.args, k) for k in OPTIMIZER_FLAGS + SCHEDULE_FLAGS + STEP_FLAGS}
    saved = {'step': state.num_updates, 'epoch': epoch, 'batch': batch, 'optimizer': state.optimizer.state_dict(),
             'scheduler': state.scheduler.state_dict(), 'scaler': state.scaler.state_dict() if state.scaler else None,
             'rng': all_gather(rng_state(), state.dist), 'log': state.log.rows, 'hparams': hparams}
    if not state.dist.primary:
        return
    if state.unproven_ckpt is not None and state.unproven_ckpt.name == f'step-{state.num_updates:08d}':
        state.unproven_ckpt = None  # the same step saved again (end of epoch after a periodic save)
    if state.unproven_ckpt is not None:  # its weights are the ones this step's finite loss came from
        state.last_ckpt = state.unproven_ckpt
    state.unproven_ckpt = save_checkpoint(
        state.out / 'checkpoints', state.num_updates, state.model.state_dict(), saved, state.identity,
        ema_state=state.ema.module.state_dict() if state.ema is not None else None, keep=state.args.checkpoint_hist)


def _nonfinite_key(*modules: nn.Module) -> Optional[str]:
    """The first floating tensor of ``modules``' state dicts with a NaN or Inf, or None (one host sync)."""
    tensors = [(k, t) for m in modules for k, t in m.state_dict().items() if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).cpu()
    return None if bool(finite.all()) else tensors[int((~finite).nonzero()[0])][0]


def _check_finite_weights(state: TrainState, epoch: int) -> None:
    """A checkpoint or the final weights must never hold a NaN or Inf: stop instead of writing them."""
    key = _nonfinite_key(state.model, *([state.ema.module] if state.ema is not None else []))
    if key is not None:
        raise TrainingError(_nan_message(f'weight {key!r}', float('nan'), epoch, state.num_updates - 1,
                                         _last_good(state)))


def _last_good(state: TrainState) -> Optional[Path]:
    """On a non-finite stop: the checkpoint a resume should start from. One this run wrote whose weights
    have not yet given a finite loss is the diverged one: renamed so that --resume auto skips it."""
    if state.unproven_ckpt is not None:
        if state.dist.primary and state.unproven_ckpt.exists():
            moved = mark_diverged(state.unproven_ckpt)
            print(f'its weights diverged: {state.unproven_ckpt.name} renamed {moved.name} (--resume auto skips it)')
        state.unproven_ckpt = None
    return state.last_ckpt


def _nan_message(what: str, value: float, epoch: int, step: int, last_ckpt: Optional[Path]) -> str:
    value = f' ({value})' if value == value else ''  # NaN: read from a flag, the value itself was not kept
    if last_ckpt is None:
        return (f'non-finite {what}{value} at epoch {epoch + 1}, step {step + 1}; stopped, nothing written '
                f'(no good checkpoint yet: start again with a lower --lr or with --clip-grad)')
    return (f'non-finite {what}{value} at epoch {epoch + 1}, step {step + 1}; stopped, nothing written (last '
            f'good checkpoint: {last_ckpt}; resume with --resume {last_ckpt} and a lower --lr or --clip-grad: '
            f'flags given on --resume override the saved ones)')


def _note_nonfinite(state: TrainState, value: torch.Tensor, kind: int) -> None:
    """Remember, on the device, the first step at which ``value`` (loss: kind 0, gradient norm: 1) was not
    finite; nothing is read back here."""
    if state.bad_at is None:
        state.bad_at = torch.full((2,), _NEVER, dtype=torch.int64, device=value.device)
    first = state.bad_at[kind:kind + 1]
    first.masked_fill_((first == _NEVER) & ~torch.isfinite(value.detach()).reshape(1), state.num_updates + 1)


def _check_health(state: TrainState, epoch: int) -> None:
    """The one place a run reads its finiteness flags back (a host sync): at a log interval, before a
    checkpoint, at an epoch's end. Every rank takes the worst rank's flags, so all stop together. Steps
    since the newest checkpoint that all had finite losses prove its weights good."""
    if state.bad_at is None:
        return
    bad = state.bad_at.clone()
    if state.dist.distributed:  # the earliest step any rank saw
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
    loss_at, grad_at = bad.tolist()
    if loss_at == _NEVER and grad_at == _NEVER:
        if state.unproven_ckpt is not None and state.num_updates > int(state.unproven_ckpt.name[-8:]):
            state.last_ckpt, state.unproven_ckpt = state.unproven_ckpt, None  # a step ran from its weights
        return
    what, step = ('loss', loss_at) if loss_at <= grad_at else ('gradient norm', grad_at)
    if state.unproven_ckpt is not None and step > int(state.unproven_ckpt.name[-8:]) + 1:
        state.last_ckpt, state.unproven_ckpt = state.unproven_ckpt, None  # finite losses came after it
    raise TrainingError(_nan_message(what, float('nan'), epoch, step - 1, _last_good(state)))


def _backward(state: TrainState, loss: torch.Tensor, divisor: int, sync: bool) -> None:
    """Back-propagate one batch's share (``loss / divisor``) of an update; under DDP the gradients are
    all-reduced only by the batch that completes it (``no_sync`` before, as timm's train.py)."""
    ddp = getattr(state.step_model, '_orig_mod', state.step_model)
    quiet = ddp.no_sync() if isinstance(ddp, DistributedDataParallel) and not sync else contextlib.nullcontext()
    with quiet:
        share = loss / divisor
        (state.scaler.scale(share) if state.scaler is not None else share).backward()


def _optimizer_step(state: TrainState, epoch: int) -> None:
    """Check the gradient norm, clip, and take the optimizer step (through the GradScaler under fp16,
    which skips the update itself when the gradients overflowed)."""
    if state.scaler is not None:
        state.scaler.unscale_(state.optimizer)
    params = [p for p in state.model.parameters() if p.grad is not None]
    if state.scaler is None and params:  # under fp16 the GradScaler skips overflowed steps itself
        # timm's dispatch_clip_grad returns no norm, and the finiteness check needs one whether or not we clip
        _note_nonfinite(state, torch.nn.utils.get_total_norm([p.grad for p in params]), 1)
    if state.args.clip_grad:
        dispatch_clip_grad(params, state.args.clip_grad)
    try:
        if state.scaler is not None:
            state.scaler.step(state.optimizer)
            state.scaler.update()
        else:
            state.optimizer.step()
    except RuntimeError as e:  # an lr so large that the step size itself overflows float32
        if 'overflow' not in str(e):
            raise
        raise TrainingError(_nan_message(f'update ({e})', float('inf'), epoch, state.num_updates,
                                         _last_good(state))) from None
    state.optimizer.zero_grad(set_to_none=True)


def _prepare_batch(state: TrainState, x: torch.Tensor, y: torch.Tensor, sums: List[float], epoch: int,
                   batch_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The batch on its device without its unreadable images (counted in ``sums[4]``), mixed when mixup /
    cutmix is on (an odd batch left by an unreadable image loses one more: they mix in pairs)."""
    x, y, skipped = state.train_loader.unreadable.exclude(x, y)  # warns once per file, or raises (strict)
    if skipped:
        sums[4] += len(skipped)
        if not len(y):
            raise TrainingError(f'every image of batch {batch_index + 1} of epoch {epoch + 1} is unreadable '
                                f'({len(skipped)}, e.g. {skipped[0]}); remove or replace them')
    if state.mixup is not None and len(y) % 2:
        x, y = x[:-1], y[:-1]
    x, y = state.train_loader.to_device(x), y.to(state.dist.device, non_blocking=True)  # uint8 -> normalised
    if state.args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if state.mixup is not None:
        x, y = state.mixup(x, y)
    return x, y


def _loss_scale(state: TrainState, divisor: int):
    """What Fast AdvProp's own backward multiplies its loss by: 1 / the accumulation divisor, through the
    GradScaler under fp16 (``scaler.scale``: a device multiply, where ``get_scale()`` would read it back)."""
    if state.scaler is None:
        return 1.0 / divisor
    return lambda loss: state.scaler.scale(loss / divisor)


def _after_update(state: TrainState, epoch: int, batch_index: int) -> None:
    """Count the update, step EMA and schedule, checkpoint as asked, note --max-steps."""
    state.num_updates += 1
    if state.ema is not None:
        state.ema.update(state.model, step=state.num_updates)
    state.scheduler.step_update(num_updates=state.num_updates)
    args = state.args
    if args.max_steps and state.num_updates >= args.max_steps:
        state.stop = True
    if (args.checkpoint_every and state.num_updates % args.checkpoint_every == 0) or state.stop:
        _checkpoint(state, epoch, batch_index)


def train_one_epoch(state: TrainState, epoch: int) -> Tuple[List[float], int]:
    """Train ``epoch`` from its start batch until its end or ``--max-steps``: an optimizer update every
    ``--grad-accum-steps`` batches (the epoch's last update takes what is left). Returns this rank's sums
    (loss, clean loss, adversarial loss, images, unreadable images skipped) and the batch reached."""
    args = state.args
    mean, std = state.data_config['mean'], state.data_config['std']
    state.model.train()
    start = state.train_loader.set_epoch(epoch, state.start_batch if epoch == state.start_epoch else 0)
    if state.mixup is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        state.mixup.mixup_enabled = False
    steps, accum = state.train_loader.steps_per_epoch, args.grad_accum_steps
    last_group = steps - (steps % accum or accum)  # first batch of the epoch's last (maybe shorter) update
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, clean, adv sums (kept on the device meanwhile), images, unreadable
    device_sums = torch.zeros(3, dtype=torch.float64, device=state.dist.device)
    progress = Progress(f'{args.mode} epoch {epoch + 1}/{state.num_epochs}', steps, start, args.log_interval,
                        state.progress, args.batch_size * state.dist.world_size)
    batch_index = start
    for x, y in state.train_loader:
        x, y = _prepare_batch(state, x, y, sums, epoch, batch_index)
        divisor = (steps - last_group) if batch_index >= last_group else accum
        early = None if state.dist.distributed else (lambda clean: _backward(state, clean, divisor, sync=True))
        losses = modes.forward_loss(
            state.step_model, x, y, state.criterion, state.mode, mean, std, autocast_dtype=state.amp_dtype,
            grad_scale=_loss_scale(state, divisor), attack_model=state.attack_model, backward_clean=early)
        _note_nonfinite(state, losses.loss, 0)
        batch_index += 1
        update = batch_index % accum == 0 or batch_index == steps
        _backward(state, losses.loss, divisor, sync=update)
        n = len(x)
        adv = losses.adv if losses.adv is not None else torch.zeros((), device=losses.loss.device)
        device_sums += torch.stack([losses.loss.detach(), losses.clean.detach(), adv.detach()]).double() * n
        sums[3] += n
        if state.watchdog is not None:
            state.watchdog.pet()
        progress.update(batch_index, lambda: dict(zip(('loss', 'clean'), (device_sums[:2] / sums[3]).tolist())))
        if update:
            _optimizer_step(state, epoch)
            _after_update(state, epoch, batch_index)
            if batch_index % args.log_interval == 0:
                _check_health(state, epoch)
            if state.stop:
                break
    progress.close()
    _check_health(state, epoch)
    sums[:3] = device_sums.tolist()
    return sums, batch_index


def validate(model: nn.Module, loader: Iterable, mean: Sequence[float], std: Sequence[float], device: torch.device,
             amp_dtype: Optional[torch.dtype], channels_last: bool, info: DistInfo,
             on_batch: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Clean validation top-1 / top-5, summed over ranks (timm's eval sampler pads the last shard);
    ``on_batch()`` after each batch."""
    m = evaluate_accuracy(model, loader, mean, std, device=device, autocast_dtype=amp_dtype,
                          channels_last=channels_last, on_batch=on_batch)
    c1, c5, n = all_reduce_sum([m['top1'] * m['images'] / 100, m['top5'] * m['images'] / 100, m['images']], info)
    return {'top1': 100 * c1 / n, 'top5': 100 * c5 / n, 'images': n}


def _end_epoch(state: TrainState, epoch: int, sums: List[float], t0: float) -> None:
    """Step the epoch schedule, validate, log the epoch's row (its images/s counts the validation, from
    ``t0``; its ``unreadable_images``, the training images skipped, goes to summary.json and the epoch line,
    not to log.csv) and checkpoint the epoch's end."""
    state.scheduler.step(epoch + 1)
    loss, clean, adv, seen, unreadable = all_reduce_sum(sums, state.dist)
    metrics = validate(state.model, state.val_loader, state.data_config['mean'], state.data_config['std'],
                       state.dist.device, state.amp_dtype, state.args.channels_last, state.dist,
                       on_batch=state.watchdog.pet if state.watchdog is not None else None)
    # seen is 0 after a resume from the epoch's last-batch checkpoint (stopped in validation): no train losses
    row = {'epoch': epoch + 1, 'step': state.num_updates, 'lr': state.optimizer.param_groups[0]['lr'],
           'train_loss': loss / seen if seen else None, 'clean_loss': clean / seen if seen else None,
           'adv_loss': adv / seen if seen and state.args.mode != 'vanilla' else None,
           'val_top1': metrics['top1'], 'images_per_s': seen / (time.perf_counter() - t0),
           'unreadable_images': int(unreadable), 'val_top5': metrics['top5']}  # the last two: not in log.csv
    state.log.append(row)
    _track_best(state, row)
    if state.progress:
        skipped = f'; {int(unreadable)} unreadable image{"s" if unreadable != 1 else ""} skipped' if unreadable else ''
        loss_text = f'{row["train_loss"]:.4f}' if seen else 'n/a (resumed at its end)'
        print(f'{state.args.mode} epoch {epoch + 1}/{state.num_epochs}: loss {loss_text} '
              f'val top-1 {row["val_top1"]:.2f}% ({row["images_per_s"]:.0f} img/s){skipped}')
    _checkpoint(state, epoch + 1, 0)


def _track_best(state: TrainState, row: Dict[str, Any]) -> None:
    """Keep the epoch with the best ``--eval-metric`` (timm's model_best): its folded weights are written
    to ``model_best.safetensors`` when it improves, and summary.json names it."""
    key = f'val_{state.args.eval_metric}'
    if state.best is not None and row[key] <= state.best['value']:
        return
    state.best = {'metric': state.args.eval_metric, 'value': row[key], 'epoch': row['epoch']}
    if state.dist.primary:
        plain = fold_dual_bn(copy.deepcopy(state.model)) if state.mode.needs_dual_bn else state.model
        save_weights(plain.state_dict(), state.out / 'model_best.safetensors',
                     metadata={'format': 'pt', 'model': state.args.model, 'epoch': str(row['epoch']),
                               state.best['metric']: str(row[key])})


def _finish(state: TrainState, start: float) -> TrainResult:
    """Fold the dual BNs away and, for a finished run, write the weights, the EMA's, the plot and the summary."""
    args, mode = state.args, state.mode
    plain = fold_dual_bn(copy.deepcopy(state.model)) if mode.needs_dual_bn else copy.deepcopy(state.model)
    steps_per_epoch = state.train_loader.steps_per_epoch
    finished = not state.stop or state.num_updates >= state.num_epochs * steps_per_epoch
    summary = {'model': args.model, 'mode': args.mode, 'attack': str(mode.attack), 'epochs': state.num_epochs,
               'steps': state.num_updates, 'finished': finished, 'world_size': state.dist.world_size,
               'train_seconds': time.perf_counter() - start,
               'val_top1': state.log.rows[-1]['val_top1'] if state.log.rows else None, 'output': str(state.out),
               'best': state.best,
               'last_checkpoint': str(newest) if (newest := state.unproven_ckpt or state.last_ckpt) else None,
               'data_config': {k: state.data_config[k] for k in ('input_size', 'mean', 'std', 'interpolation',
                                                                 'crop_pct')}}
    if state.dist.primary and finished:
        _check_finite_weights(state, state.num_epochs - 1)
        meta = {'format': 'pt', 'model': args.model, 'mode': args.mode, 'attack': str(mode.attack),
                'epochs': str(state.num_epochs), 'advprop_zoo': __version__}
        summary['weights'] = str(save_weights(plain.state_dict(), state.out / 'model.safetensors', metadata=meta))
        if state.ema is not None:
            ema = state.ema.module
            ema_plain = fold_dual_bn(copy.deepcopy(ema)) if mode.needs_dual_bn else ema
            save_weights(ema_plain.state_dict(), state.out / 'model_ema.safetensors', metadata={**meta, 'ema': 'true'})
        summary['plot'] = state.log.plot(title=f'{args.model} {args.mode}')
        state.log.write_summary(summary)
    return TrainResult(summary, plain, state.val_loader, state.data_config)


def train(args: argparse.Namespace) -> TrainResult:
    """Run one training job described by parsed ``args``, in this process or as one rank of a torchrun
    job. Raises TrainingError / CheckpointError / DataError / ValueError on bad input, before anything
    long starts where it can."""
    state = setup(args)
    start = time.perf_counter()
    try:
        _train_epochs(state)
    except TrainingError:
        raise
    except RuntimeError as e:  # a collective that failed: name the rank at fault, in one line
        line = collective_failure(e, state.dist)
        if line is None:
            raise
        raise TrainingError(line) from e
    finally:
        if state.watchdog is not None:
            state.watchdog.stop()
    return _finish(state, start)


def _train_epochs(state: TrainState) -> None:
    steps_per_epoch = state.train_loader.steps_per_epoch
    for epoch in range(state.start_epoch, state.num_epochs):
        t0 = time.perf_counter()
        sums, batch_index = train_one_epoch(state, epoch)
        if state.stop and batch_index < steps_per_epoch:
            break  # stopped mid-epoch by --max-steps: its checkpoint resumes here
        _end_epoch(state, epoch, sums, t0)
        if state.stop:
            break
