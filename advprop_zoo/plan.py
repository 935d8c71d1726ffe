"""Planning a re-training: what one step of each mode costs against a vanilla step, how many steps and
images a run takes, and the GPU-hours that follow from a vanilla throughput somebody measured.

The step cost is a count, not a timing, so it can be checked by hand (``COUNTING_RULE``). A measured
ratio comes only from the GPU check's JSON (``benchmarks/gpu.py``), and GPU-hours only from a vanilla
throughput the user gives or that JSON holds, for the model it was measured on: nothing here invents a
throughput, since a guess that reads like a measurement would plan a run that does not fit its budget.
"""
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .attacks import AttackConfig, paper_steps
from .efficientnet_advprop import AdvPropVariant, get_variant, paper_attacker
from .errors import AdvPropZooError
from .modes import MODES
from .names import UnknownModelError
from .table import format_table

__all__ = [
    'IMAGENET_TRAIN_IMAGES', 'DEFAULT_BATCH_SIZE', 'RECIPE_EPOCHS', 'COUNTING_RULE', 'SHORT_RULE', 'NO_THROUGHPUT',
    'MeasuredFileError', 'MeasuredRow', 'Measured', 'read_measured', 'resolve_epochs', 'step_cost',
    'measured_row_name', 'plan_rows', 'plan_table',
]

IMAGENET_TRAIN_IMAGES = 1_281_167  # ImageNet-1k train split
DEFAULT_BATCH_SIZE = 64  # per GPU, as advprop-zoo train's --batch-size
# epochs of advprop_zoo_train/recipes.py's presets (the library never imports the train package;
# tests/test_plan.py checks the two agree)
RECIPE_EPOCHS: Dict[str, int] = {'paper': 350, 'finetune': 30}
NO_THROUGHPUT = 'give --vanilla-images-per-s'  # the GPU-hours cell when no throughput is known
COUNTING_RULE = (
    'Step cost counting rule: 1 unit = one forward+backward pass over the per-GPU batch = one vanilla step. '
    'vanilla: 1. advprop with PGD-k: clean pass 1 + k attack passes + adversarial pass 1 = 2 + k (PGD-1 3.0x, '
    'PGD-5 7.0x; --split-bn\'s one pass over [clean; adv] also counts 2). adv-train with PGD-k: one pass over '
    '[clean; adv] 2 + k (clean weight 0, Madry: 1 + k). fast-advprop: its clean pass also gives the attack\'s '
    'input gradients (0 attack passes) + one pass over the round(p_adv x batch) attacked images: '
    '1 + round(p_adv x batch) / batch (1.20x for p_adv 0.2, batch 64). An attack pass computes input '
    'gradients only, so counts are an upper bound; the measured ratio is what a GPU did.')


SHORT_RULE = ('Step cost in vanilla steps, counted: vanilla 1, advprop / adv-train 2 + PGD steps, fast-advprop '
              '1 + attacked fraction; the rule: advprop-zoo plan --help.')


class MeasuredFileError(AdvPropZooError, ValueError):
    """A --measured file that is not the GPU check's JSON."""


@dataclass(frozen=True)
class MeasuredRow:
    """One mode as ``benchmarks/gpu.py`` measured it."""
    name: str
    images_per_s: float
    ratio_to_vanilla: float
    p_adv: Optional[float] = None  # fast-advprop's fraction, where the file says


@dataclass(frozen=True)
class Measured:
    """The GPU check's JSON: the device, the model it ran (where the file says) and its rows by name."""
    path: str
    device: str
    rows: Dict[str, MeasuredRow] = field(default_factory=dict)
    model: Optional[str] = None


def _positive(value: Any) -> Optional[float]:
    """``value`` as a finite positive float, else None (booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value > 0 else None


def read_measured(path: str) -> Measured:
    """Read the GPU check's JSON, failing in one line on anything without ``device`` and ``rows`` of
    ``name`` / ``images_per_s`` / ``ratio_to_vanilla``: a plan must not rest on half a file."""
    def bad(what: str) -> MeasuredFileError:
        return MeasuredFileError(f'{path}: not a GPU check result (benchmarks/gpu.py JSON): {what}')

    with open(path, 'rb') as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode('utf-8'))
    except UnicodeDecodeError:
        raise bad('not UTF-8 text') from None
    except json.JSONDecodeError as e:
        raise bad(f'not JSON ({e.msg} at line {e.lineno} column {e.colno})') from None
    if not isinstance(data, dict):
        raise bad(f'a JSON {type(data).__name__}, not an object')
    device = data.get('device')
    if not isinstance(device, str) or not device.strip():
        raise bad('no "device" string')
    rows = data.get('rows')
    if not isinstance(rows, list) or not rows:
        raise bad('no "rows" list')
    by_name: Dict[str, MeasuredRow] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get('name'), str):
            raise bad(f'rows[{i}] has no "name"')
        name = row['name']
        values = {key: _positive(row.get(key)) for key in ('images_per_s', 'ratio_to_vanilla')}
        for key, value in values.items():
            if value is None:
                raise bad(f'row {name!r} has no positive number "{key}" (got {row.get(key)!r})')
        if name in by_name:
            raise bad(f'row {name!r} appears twice')
        by_name[name] = MeasuredRow(name, values['images_per_s'], values['ratio_to_vanilla'],
                                    _positive(row.get('p_adv')))
    model = data.get('model')
    return Measured(str(path), device.strip(), by_name, model if isinstance(model, str) and model else None)


def resolve_epochs(epochs: Optional[int], recipe: Optional[str]) -> int:
    """``epochs`` if given, else the recipe's; neither is an error rather than a silent default, since the
    epoch count scales every total."""
    if recipe is not None and recipe not in RECIPE_EPOCHS:
        raise ValueError(f'unknown recipe {recipe!r}; choose one of {", ".join(RECIPE_EPOCHS)}')
    if epochs is None:
        if recipe is None:
            raise ValueError(f'give --epochs N or --recipe paper ({RECIPE_EPOCHS["paper"]} epochs)')
        return RECIPE_EPOCHS[recipe]
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f'epochs must be a positive integer, got {epochs!r}')
    return epochs


def step_cost(mode: str, attack_steps: int = 1, batch_size: int = DEFAULT_BATCH_SIZE, p_adv: float = 0.2,
              clean_weight: float = 0.5) -> Tuple[int, float]:
    """``(attack passes, step cost in vanilla-step units)`` of one step of ``mode`` by ``COUNTING_RULE``;
    fast-advprop's attacked count is ``modes.forward_loss``'s ``min(n, max(1, round(p_adv * n)))``."""
    if mode not in MODES:
        raise ValueError(f'unknown training mode {mode!r}; choose one of {", ".join(MODES)}')
    if mode == 'vanilla':
        return 0, 1.0
    if mode == 'fast-advprop':
        if not 0 < p_adv <= 1:
            raise ValueError(f'p_adv must be in (0, 1], got {p_adv}')
        attacked = min(batch_size, max(1, round(p_adv * batch_size)))
        return 0, 1.0 + attacked / batch_size
    if attack_steps < 1:
        raise ValueError(f'attack steps must be >= 1, got {attack_steps}')
    if mode == 'advprop':
        return attack_steps, 2.0 + attack_steps
    if not 0 <= clean_weight <= 1:
        raise ValueError(f'clean weight must be in [0, 1], got {clean_weight}')
    return attack_steps, (1.0 if clean_weight == 0 else 2.0) + attack_steps  # adv-train


def measured_row_name(mode: str, attack_steps: int) -> Optional[str]:
    """The GPU check's row name for a mode and PGD step count (None: the check does not measure it)."""
    if mode == 'advprop':
        return f'advprop-pgd{attack_steps}'
    return mode if mode in ('vanilla', 'fast-advprop') else None


def _is_model(name: Optional[str], variant: AdvPropVariant) -> bool:
    """Whether ``name`` (a zoo name, with or without a tag, or timm's TF-port name) is ``variant``."""
    if not name:
        return False
    base = name.split('.', 1)[0]
    try:
        return get_variant(base) is variant
    except UnknownModelError:
        return base == variant.timm_arch


def plan_rows(
        models: Sequence[str],
        mode: str = 'advprop',
        gpus: int = 1,
        epochs: int = RECIPE_EPOCHS['paper'],
        batch_size: int = DEFAULT_BATCH_SIZE,
        images: int = IMAGENET_TRAIN_IMAGES,
        attack_eps: Optional[float] = None,
        attack_steps: Optional[int] = None,
        p_adv: float = 0.2,
        clean_weight: float = 0.5,
        vanilla_images_per_s: Optional[float] = None,
        throughput_model: Optional[str] = None,
        measured: Optional[Measured] = None,
) -> List[Dict[str, Any]]:
    """One plan row per model: attack passes, counted and measured step cost, steps and images per epoch
    and in total, and GPU-hours where a vanilla throughput for that model is known.

    ``vanilla_images_per_s`` (per GPU) was measured on ``throughput_model``; ``measured``'s vanilla row
    on its own ``model``, or on ``throughput_model`` when the file does not say. A throughput is per
    model, resolution and GPU, so it is never carried over to another size: that row's ``gpu_hours`` is
    None and its ``throughput_source`` says why. Steps drop the last partial global batch, as the train
    loop's sampler does. GPU-hours = images x cost / vanilla images/s / 3600, cost = the measured ratio
    where the file has the mode's row, else the counted one.
    """
    for name, value in (('gpus', gpus), ('batch size', batch_size), ('images', images), ('epochs', epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive integer, got {value!r}')
    if mode not in MODES:
        raise ValueError(f'unknown training mode {mode!r}; choose one of {", ".join(MODES)}')
    if attack_steps is not None and mode not in ('advprop', 'adv-train'):
        raise ValueError(f'--attack-steps applies to advprop and adv-train; {mode} runs no PGD')
    if vanilla_images_per_s is not None:
        if _positive(vanilla_images_per_s) is None:
            raise ValueError(f'vanilla images/s must be a positive number, got {vanilla_images_per_s!r}')
        if throughput_model is None:
            raise ValueError('a vanilla throughput belongs to one model: name it with --model')
        get_variant(throughput_model)
    global_batch = batch_size * gpus
    steps_per_epoch = images // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f'the global batch ({batch_size} x {gpus} GPUs = {global_batch}) is larger than the '
                         f'{images:,} images: no full step per epoch')
    variants = [get_variant(m) for m in models]
    measured_model = (measured.model or throughput_model) if measured is not None else None
    vanilla_row = measured.rows.get('vanilla') if measured is not None else None

    rows = []
    for v in variants:
        if mode in ('advprop', 'adv-train'):
            eps = paper_attacker(v.name).eps if attack_eps is None else attack_eps
            attack = AttackConfig(eps=eps, steps=paper_steps(eps) if attack_steps is None else attack_steps)
            steps, attack_text = attack.resolved().steps, str(attack)
        else:
            steps, attack_text = 1, ('reuses the clean pass' if mode == 'fast-advprop' else 'none')
        passes, cost = step_cost(mode, steps, batch_size, p_adv, clean_weight)
        if mode == 'fast-advprop':
            attack_text += f', p_adv {p_adv:g}'

        measured_ratio = None
        key = measured_row_name(mode, steps)
        if measured is not None and key in measured.rows:
            row = measured.rows[key]
            if not (mode == 'fast-advprop' and row.p_adv is not None and not math.isclose(row.p_adv, p_adv)):
                measured_ratio = row.ratio_to_vanilla

        throughput, source = None, NO_THROUGHPUT
        if vanilla_images_per_s is not None and _is_model(throughput_model, v):
            throughput, source = float(vanilla_images_per_s), '--vanilla-images-per-s'
        elif vanilla_row is not None and _is_model(measured_model, v):
            throughput, source = vanilla_row.images_per_s, measured.path
        total_steps = steps_per_epoch * epochs
        total_images = total_steps * global_batch
        used_cost = cost if measured_ratio is None else measured_ratio
        rows.append(dict(
            model=v.name, input=v.res, mode=mode, attack=attack_text, attack_passes=passes, cost=cost,
            measured_ratio=measured_ratio, global_batch=global_batch, steps_per_epoch=steps_per_epoch,
            images_per_epoch=steps_per_epoch * global_batch, epochs=epochs, steps=total_steps,
            images=total_images, vanilla_images_per_s=throughput, throughput_source=source,
            gpu_hours=None if throughput is None else total_images * used_cost / throughput / 3600,
        ))
    return rows


def plan_table(rows: Sequence[Dict[str, Any]], gpus: int, measured: Optional[Measured] = None) -> str:
    """``plan_rows`` as the Markdown table every command prints, with the notes that say where each
    number came from."""
    headers = ['model', 'input', 'mode', 'attack', 'attack passes', 'step cost (counted)', 'step cost (measured)',
               'global batch', 'steps/epoch', 'images/epoch', 'epochs', 'steps', 'images', 'GPU-hours']
    cells = [[r['model'], r['input'], r['mode'], r['attack'], r['attack_passes'], f'{r["cost"]:.2f}x',
              None if r['measured_ratio'] is None else f'{r["measured_ratio"]:.2f}x', f'{r["global_batch"]:,}',
              f'{r["steps_per_epoch"]:,}', f'{r["images_per_epoch"]:,}', r['epochs'], f'{r["steps"]:,}',
              f'{r["images"]:,}', NO_THROUGHPUT if r['gpu_hours'] is None else f'{r["gpu_hours"]:,.1f}']
             for r in rows]
    notes = []
    if measured is not None:
        notes.append(f'Measured ratios: {measured.path} ({measured.device}'
                     + (f', {measured.model}' if measured.model else '')
                     + '), shown for every model with the same mode and PGD steps.')
    used = {(r['model'], r['throughput_source'], r['vanilla_images_per_s']) for r in rows if r['gpu_hours'] is not None}
    for model, source, throughput in sorted(used):
        taken = ' (the file does not name its model: taken as --model\'s)' if (
            measured is not None and source == measured.path and not measured.model) else ''
        cost = ('the counted step cost' if measured is None
                else 'the step cost (measured where the file has the mode, else counted)')
        wall = '' if gpus == 1 else f'; wall-clock about GPU-hours / {gpus} at perfect scaling'
        notes.append(f'GPU-hours for {model}: images x {cost} / vanilla {throughput:,.1f} images/s per GPU from '
                     f'{source}{taken}{wall}.')
    if measured is not None and 'vanilla' in measured.rows and not any(s == measured.path for _, s, _ in used):
        if measured.model is None:
            notes.append(f'{measured.path} does not name the model it measured: name it with --model to use its '
                         f'vanilla images/s.')
        elif not any(_is_model(measured.model, get_variant(r['model'])) for r in rows):
            notes.append(f'{measured.path} measured {measured.model}: its vanilla images/s gives no other model\'s '
                         f'GPU-hours.')
    if any(r['gpu_hours'] is None for r in rows):
        notes.append('A vanilla throughput is per model, resolution and GPU: GPU-hours appear only for the model it '
                     'was measured on (--model with --vanilla-images-per-s, or the --measured file\'s model).')
    notes.append(SHORT_RULE)
    return format_table(headers, cells, align='lrllrrrrrrrrrr') + '\n\n' + '\n'.join(notes)
