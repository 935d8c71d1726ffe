"""Convert TF EfficientNet-B0…B8 checkpoints (AdvProp and the other B-series releases) to timm safetensors.

    python convert/tf_to_timm.py --checkpoint efficientnet-b3.tar.gz --output b3.safetensors --verify

Each timm tensor is filled from the TF variable that ``tf_names`` derives from the timm model itself,
preferring the EMA twins the release evaluates with. The conversion refuses to write anything unless
every model tensor was filled exactly once and every weight variable of the checkpoint was used, so a
wrong variant, a damaged file or a checkpoint from another architecture cannot yield a file that loads
but is wrong. ``--verify`` proves the numbers against Keras's independent EfficientNet.
"""
import argparse
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple

if __package__ in (None, ''):  # run as a script: make the repo root importable for `convert.*`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from timm.models._hub import save_config_for_hf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from advprop_zoo.dual_bn import aux_key, is_aux_key  # noqa: E402
from advprop_zoo.efficientnet_advprop import VARIANTS  # noqa: E402
from advprop_zoo.errors import AdvPropZooError, describe_error, run_command  # noqa: E402
from advprop_zoo.names import check_model_name  # noqa: E402
from advprop_zoo.table import format_table  # noqa: E402
from advprop_zoo.weights import (  # noqa: E402
    SafetensorsWriter, WeightsError, atomic_write, check_output_path, check_state_dict,
)
from convert import __version__  # noqa: E402
from convert.tf_checkpoint import (  # noqa: E402
    EMA_SUFFIX, TARBALL_SUFFIXES, Checkpoint, is_bookkeeping, open_checkpoint,
)
from convert.tf_names import BN_VARIABLES, VECTOR, TFTensor, tf_name_map, tf_to_timm_layout  # noqa: E402

if TYPE_CHECKING:
    from convert.keras_reference import Verification

__all__ = ['ConversionResult', 'convert', 'convert_batch', 'model_for_checkpoint', 'main']

FAMILIES = {'advprop': 'efficientnet_b{}_advprop', 'tf': 'tf_efficientnet_b{}'}
_LEVEL = re.compile(r'(?:efficientnet_b(\d)_advprop|tf_efficientnet_b(\d))')
_BN_LEAVES = tuple(BN_VARIABLES.values())


@dataclass
class ConversionResult:
    """What one conversion did, for the report line and the batch table."""
    source: Path
    model: str
    scope: str
    ema: bool
    weights: int  # TF variables converted (aux BNs included)
    ignored: int  # optimizer slots + global_step, and the unused raw/EMA copies
    aux_bns: int
    output: Optional[Path] = None
    config: Optional[Path] = None
    verify: Optional['Verification'] = None  # set by --verify
    seconds: float = 0.0
    # wall seconds of each step on the main thread, in order (open, structure, read+write, ...), and of
    # the source hash on its own thread: where a conversion's time goes (benchmarks/convert.py prints them)
    phases: Dict[str, float] = field(default_factory=dict)
    hash_seconds: float = 0.0
    metadata: Dict[str, str] = field(default_factory=dict)

    def lines(self) -> List[str]:
        which = 'EMA twins' if self.ema else 'raw weights'
        out = [f'{self.source} [{self.scope}] -> {self.model}',
               f'weights: {which} ({self.weights} variables); ignored: {self.ignored} '
               '(optimizer slots, global_step, unused EMA/raw copies)',
               f'auxiliary BNs: {self.aux_bns} found, written as <bn>.aux_bn.0.*' if self.aux_bns
               else 'auxiliary BNs: none found']
        if self.verify is not None:
            out.append(str(self.verify))
        if self.output is not None:
            out.append(f'wrote {self.output}' + (f' and {self.config}' if self.config else '')
                       + f' in {self.seconds:.1f}s')
        return out


# ---------------------------------------------------------------------------------------------------
# which model, and which TF variable fills which timm tensor

def _level(model_name: str) -> Optional[int]:
    m = _LEVEL.fullmatch(model_name.split('.', 1)[0])
    return int(m.group(1) or m.group(2)) if m else None


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Weight initialisation as a no-op on meta tensors: there are no values to initialise, yet torch
    still runs each init op through its reference decompositions (two thirds of building a B0)."""
    _METHODS = {'normal_', 'uniform_', 'zero_', 'fill_'}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        is_init = getattr(func, '__module__', None) == 'torch.nn.init' or getattr(func, '__name__', None) in self._METHODS
        tensor = args[0] if args else kwargs.get('tensor')
        if is_init and isinstance(tensor, torch.Tensor) and tensor.is_meta:
            return tensor
        return func(*args, **kwargs)


@lru_cache(maxsize=None)
def _meta_model(model_name: str) -> torch.nn.Module:
    """The model's structure only: names and shapes without allocating weights (built once per name)."""
    with torch.device('meta'), _SkipInit():
        return timm.create_model(model_name.split('.', 1)[0])


@lru_cache(maxsize=None)
def _expected(model_name: str) -> Tuple[TFTensor, ...]:
    return tuple(tf_name_map(_meta_model(model_name)))


def _looks_like(found: Dict[str, Tuple[int, ...]]) -> Optional[int]:
    """The level whose full name/shape set the checkpoint's weights match, if any."""
    for v in VARIANTS:
        expected = {e.tf_name: e.tf_shape for e in _expected(v.name)}
        if all(found.get(k) == s for k, s in expected.items()):
            return v.level
    return None


def model_for_checkpoint(scope: str, found: Dict[str, Tuple[int, ...]], family: str = 'advprop') -> str:
    """Infer the model: the level the scope name ``efficientnet-bN`` gives (the completeness check then
    reports any shape that disagrees), else the variant whose names and shapes the checkpoint matches."""
    m = re.fullmatch(r'efficientnet-b(\d)', scope)
    level = int(m.group(1)) if m and int(m.group(1)) < len(VARIANTS) else _looks_like(found)
    if level is None:
        raise WeightsError(f'cannot tell which EfficientNet scope {scope!r} holds: its shapes match none of B0-B8; '
                           'pass --model')
    return FAMILIES[family].format(level)


def _check_model(name: str) -> str:
    """A B-series model name, optionally with a pretrained tag (whose cfg, mean/std included, config.json records)."""
    base = check_model_name(name)
    if _level(base) is None:
        raise WeightsError(f'--model {name}: this converter handles the B-series EfficientNets only '
                           f'(efficientnet_b0_advprop ... efficientnet_b8_advprop, tf_efficientnet_b0 ... b8)')
    if '.' in name and name not in timm.list_pretrained(f'{base}.*'):
        tags = ', '.join(t.split('.', 1)[1] for t in timm.list_pretrained(f'{base}.*'))
        raise WeightsError(f'--model {name}: {base} has no pretrained tag {name.split(".", 1)[1]!r} (tags: {tags})')
    return name


def _scope(ckpt: Checkpoint) -> str:
    scopes = sorted({n.split('/', 1)[0] for n in ckpt.shapes if '/' in n and not is_bookkeeping(n)})
    if len(scopes) != 1:
        raise WeightsError(f'{ckpt.source}: expected one model scope (efficientnet-bN/...), found '
                           f'{len(scopes)}: {", ".join(scopes[:5]) or "none"}')
    return scopes[0]


def _choose_copies(ckpt: Checkpoint, scope: str, use_ema: bool) -> Tuple[Dict[str, str], bool]:
    """{name under scope: checkpoint variable}, taking every EMA twin (or every raw weight).
    A checkpoint with twins for only some weights is refused: mixing them would be a silent error."""
    raw, ema = set(), set()
    for name in ckpt.shapes:
        if is_bookkeeping(name) or not name.startswith(scope + '/'):
            continue
        (ema if name.endswith(EMA_SUFFIX) else raw).add(name)
    twins = {n[:-len(EMA_SUFFIX)] for n in ema}
    if use_ema and twins:
        lone = sorted(raw - twins)
        if lone:
            raise WeightsError(f'{ckpt.source}: {len(lone)} weights have no EMA twin (first: {lone[0]}); '
                               'pass --no-ema to convert the raw weights')
        chosen = {n: n + EMA_SUFFIX for n in twins}
    else:
        lone = sorted(twins - raw)
        if lone:
            raise WeightsError(f'{ckpt.source}: {len(lone)} weights exist only as EMA copies (first: {lone[0]}); '
                               'drop --no-ema')
        chosen = {n: n for n in raw}
    return {n[len(scope) + 1:]: v for n, v in chosen.items()}, bool(use_ema and twins)


def _aux_bns(unexpected: Dict[str, Tuple[int, ...]], expected: Sequence[TFTensor]) -> Dict[str, str]:
    """Pair leftover BN-shaped variable groups with the main BN they mirror: {TF layer: main BN's timm module}.

    A leftover group pairs when its name is a main BN's with an ``aux`` marker added
    (``.../aux_bn/tpu_batch_normalization_1``, ``..._aux``), or when a scope's leftover BNs continue its
    main BNs' numbering (``tpu_batch_normalization_3``, ``_4``, ``_5`` beside ``_0`` ... ``_2``) and pair
    with them in order, channel counts agreeing.
    """
    groups: Dict[str, int] = {}
    for layer in {n.rsplit('/', 1)[0] for n in unexpected}:
        shapes = {unexpected.get(f'{layer}/{v}') for v in _BN_LEAVES}
        if len(shapes) == 1 and None not in shapes and len(next(iter(shapes))) == 1:
            groups[layer] = next(iter(shapes))[0]
    mains = {e.tf_layer: (e.timm_key.rsplit('.', 1)[0], e.shape[0]) for e in expected if e.tf_name.endswith('/gamma')}
    paired: Dict[str, str] = {}
    for layer, channels in groups.items():  # an explicit aux marker
        plain = re.sub(r'/aux(iliary)?(_bn)?(?=/)|_aux(iliary)?(_bn)?$', '', layer)
        if plain != layer and mains.get(plain, (None, None))[1] == channels:
            paired[layer] = mains[plain][0]
    by_scope: Dict[str, List[str]] = {}
    for layer in groups:
        if layer not in paired and re.search(r'/tpu_batch_normalization(_\d+)?$', layer):
            by_scope.setdefault(layer.rsplit('/', 1)[0], []).append(layer)
    number = lambda layer: int(layer.rsplit('_', 1)[1]) if layer[-1].isdigit() else 0  # noqa: E731
    for scope, leftovers in by_scope.items():  # numbering continues after the main BNs
        main_layers = sorted((m for m in mains if m.rsplit('/', 1)[0] == scope), key=number)
        leftovers.sort(key=number)
        if (len(leftovers) == len(main_layers) and number(leftovers[0]) == len(main_layers)
                and all(groups[a] == mains[m][1] for a, m in zip(leftovers, main_layers))):
            paired.update((a, mains[m][0]) for a, m in zip(leftovers, main_layers))
    return paired


def _first(names: Sequence[str], n: int = 3) -> str:
    more = f' and {len(names) - n} more' if len(names) > n else ''
    return ', '.join(names[:n]) + more


def _check_complete(ckpt: Checkpoint, scope: str, model: str, found: Dict[str, Tuple[int, ...]],
                    expected: Sequence[TFTensor], leftover: Sequence[str]) -> None:
    """One line naming the first missing, unexpected and mis-shaped variables, with a guess at the variant."""
    need = {e.tf_name: e.tf_shape for e in expected}
    missing = sorted(n for n in need if n not in found)
    misshaped = [f'{n} {list(found[n])} (model: {list(need[n])})' for n in need if n in found and found[n] != need[n]]
    if not (missing or misshaped or leftover):
        return
    parts = []
    if misshaped:
        parts.append(f'{len(misshaped)} mis-shaped: {_first(misshaped, 2)}')
    if missing:
        parts.append(f'{len(missing)} missing: {_first(missing)}')
    if leftover:
        parts.append(f'{len(leftover)} unexpected: {_first(sorted(leftover))}')
    level = _looks_like(found)
    hint = f'; this looks like efficientnet-b{level}' if level is not None and _level(model) != level else ''
    raise WeightsError(f'{ckpt.source}: scope {scope!r} does not fit {model}: {"; ".join(parts)}{hint}')


# ---------------------------------------------------------------------------------------------------
# conversion

def _read(ckpt: Checkpoint, name: str) -> np.ndarray:
    array = ckpt.read(name)
    if not np.issubdtype(array.dtype, np.floating):
        raise WeightsError(f'{ckpt.source}: {name} is {array.dtype}, not a float weight')
    if not np.isfinite(array.sum()):  # one pass, no mask; an overflowing sum is checked exactly below
        bad = int(array.size - np.isfinite(array).sum())
        if bad:
            raise WeightsError(f'{ckpt.source}: {name} holds {bad} NaN/Inf values')
    return array if array.dtype == np.float32 else array.astype(np.float32)


@dataclass(frozen=True)
class _Entry:
    """One tensor of the output: its timm key, shape and dtype, and where it comes from."""
    key: str
    shape: Tuple[int, ...]
    dtype: str = 'float32'
    tf_name: Optional[str] = None  # None: a BN step counter, which TF does not keep (timm's initial 0)
    layout: str = VECTOR


def _plan(chosen: Dict[str, str], shapes: Dict[str, Tuple[int, ...]], expected: Sequence[TFTensor],
          aux: Dict[str, str], model_keys: Sequence[str]) -> List[_Entry]:
    """Every output tensor in file order: the BN step counters first (8-byte values at 8-aligned
    offsets), then the weights in the model's order, then the auxiliary BNs."""
    plan = [_Entry(k, (), 'int64') for k in model_keys if k.endswith('.num_batches_tracked')]
    plan += [_Entry(aux_key(bn, 'num_batches_tracked'), (), 'int64') for _, bn in sorted(aux.items())]
    plan += [_Entry(e.timm_key, e.shape, tf_name=chosen[e.tf_name], layout=e.layout) for e in expected]
    for layer, bn in sorted(aux.items()):
        for tensor, var in BN_VARIABLES.items():
            name = chosen[f'{layer}/{var}']
            plan.append(_Entry(aux_key(bn, tensor), tuple(shapes[name]), tf_name=name))
    return plan


def _arrays(ckpt: Checkpoint, plan: Sequence[_Entry], reuse: bool = False) -> Iterator[Tuple[str, np.ndarray]]:
    """The plan's arrays, read and put in timm's layout one at a time. ``reuse``: transposed arrays
    share one buffer, valid until the next one is asked for (what a streaming writer needs)."""
    scratch = np.empty(max((int(np.prod(e.shape)) for e in plan), default=0), np.float32) if reuse else None
    for e in plan:
        if e.tf_name is None:
            yield e.key, np.zeros((), dtype=np.int64)
        else:
            yield e.key, tf_to_timm_layout(_read(ckpt, e.tf_name), e.layout, out=scratch)


def _write_config(model_name: str, path: Path) -> None:
    """timm's own config.json (what ``local-dir:`` and the Hub read), written atomically."""
    with torch.device('meta'):
        model = timm.create_model(model_name)  # with its tag: the tag's pretrained cfg goes into config.json
    with tempfile.TemporaryDirectory() as tmp:
        save_config_for_hf(model, f'{tmp}/config.json')
        text = Path(tmp, 'config.json').read_text()
    with atomic_write(path, 'w') as f:
        f.write(text)


def convert(
        checkpoint: os.PathLike,
        output: Optional[str],
        model: Optional[str] = None,
        use_ema: bool = True,
        verify: bool = False,
        config: bool = False,
        force: bool = False,
        family: str = 'advprop',
        make_dirs: bool = False,
) -> ConversionResult:
    """Convert one TF checkpoint (tarball, folder or prefix) to timm safetensors at ``output``.

    ``output`` may contain ``{model}``, filled with the (inferred) model name; ``make_dirs`` creates its
    folder. Nothing is written unless the checkpoint fits the model completely and, with ``verify``,
    Keras agrees on the logits. ``output=None`` converts and checks without writing.
    """
    start = last = time.perf_counter()
    phases: Dict[str, float] = {}

    def lap(phase: str) -> None:
        nonlocal last
        now = time.perf_counter()
        phases[phase] = now - last  # each phase ends once
        last = now

    model = _check_model(model) if model else None
    templated = output is not None and '{model}' in str(output)

    def targets(model: str) -> Tuple[Optional[Path], Optional[Path]]:
        out = Path(str(output).replace('{model}', model)) if output is not None else None
        if out is not None:
            if make_dirs:
                out.parent.mkdir(parents=True, exist_ok=True)
            for path in (out, out.parent / 'config.json' if config else None):
                if path is not None:
                    check_output_path(path, overwrite=force)
        return out, out.parent / 'config.json' if out is not None and config else None

    if not templated:
        targets('')  # fail on the output before unpacking or reading anything
    with open_checkpoint(checkpoint) as ckpt:
        lap('open')
        scope = _scope(ckpt)
        chosen, ema = _choose_copies(ckpt, scope, use_ema)
        found = {n: ckpt.shapes[v] for n, v in chosen.items()}
        model = model or model_for_checkpoint(scope, found, family)
        out, config_path = targets(model)
        expected = _expected(model)
        need = {e.tf_name for e in expected}
        unexpected = {n: s for n, s in found.items() if n not in need}
        aux = _aux_bns(unexpected, expected)
        leftover = [n for n in unexpected if n.rsplit('/', 1)[0] not in aux]
        _check_complete(ckpt, scope, model, found, expected, leftover)
        meta = _meta_model(model)
        plan = _plan(chosen, ckpt.shapes, expected, aux, list(meta.state_dict()))
        # timm's own keys and shapes, every one, before anything is read
        check_state_dict({e.key: torch.empty(e.shape, device='meta') for e in plan}, meta,
                         ignore=[e.key for e in plan if is_aux_key(e.key)])
        lap('structure')
        result = ConversionResult(Path(checkpoint), model, scope, ema, weights=len(chosen), aux_bns=len(aux),
                                  ignored=len(ckpt.shapes) - len(chosen))
        metadata = {
            'format': 'pt',
            'source': Path(checkpoint).name,
            'variant': model,
            'tf_scope': scope,
            'ema': str(ema).lower(),
            'aux_bns': str(len(aux)),
            'converter': f'advprop-zoo convert/tf_to_timm.py {__version__}',
        }

        def check(state_dict: Dict[str, torch.Tensor]) -> None:
            from convert.keras_reference import verify_against_keras
            result.verify = verify_against_keras(lambda n: ckpt.read(chosen[n]), need, model, _level(model),
                                                 state_dict)

        if out is None:  # convert and check, write nothing
            state_dict = {k: torch.from_numpy(a) for k, a in _arrays(ckpt, plan)}  # reads and checks every tensor
            lap('read')
            if verify:
                check(state_dict)
                lap('verify')
            metadata['source_sha256'] = json.dumps(ckpt.source_sha256(), sort_keys=True)
            lap('source hash wait')
        else:
            # the arrays stream into the output's temp file as they are read; it replaces `out` only once
            # every one was written and --verify (on the file as written) passed. The source hash runs
            # beside all this and is written into the header last (16 KiB reserved: ~150 file digests)
            with SafetensorsWriter(out, [(e.key, e.dtype, e.shape) for e in plan],
                                   metadata_reserve=len(json.dumps(metadata)) + (16 << 10)) as writer:
                for key, array in _arrays(ckpt, plan, reuse=True):
                    writer.write(key, array)
                lap('read+write')
                if verify:
                    check(load_file(str(writer.temp_path)))
                    lap('verify')
                metadata['source_sha256'] = json.dumps(ckpt.source_sha256(), sort_keys=True)
                lap('source hash wait')
                writer.metadata = metadata
            lap('fsync+rename')
            result.output = out
        result.metadata = metadata
        result.hash_seconds = ckpt.hash_seconds
    lap('close')  # a tarball's temp dir removed
    if out is not None and config_path is not None:
        try:
            _write_config(model, config_path)
        except BaseException:
            out.unlink(missing_ok=True)  # the pair is the product: no weights without their config
            raise
        result.config = config_path
        lap('config')
    result.phases = phases
    result.seconds = time.perf_counter() - start
    return result


def convert_batch(folder: os.PathLike, output_dir: os.PathLike, **kwargs) -> Tuple[List[List[str]], int]:
    """Convert every tarball in ``folder`` to ``output_dir/<model>/model.safetensors`` (timm's
    ``local-dir:`` layout) under one progress bar; returns the summary rows and how many failed."""

    folder, output_dir = Path(folder), Path(output_dir)
    if not folder.is_dir():
        raise WeightsError(f'{folder}: no such folder')
    tarballs = sorted(p for p in folder.iterdir() if p.name.endswith(TARBALL_SUFFIXES) and p.is_file())
    if not tarballs:
        raise WeightsError(f'{folder}: no tarballs ({", ".join("*" + s for s in TARBALL_SUFFIXES)}) in it')
    output_dir.mkdir(parents=True, exist_ok=True)
    template = str(output_dir / '{model}' / 'model.safetensors')
    rows, failed, written = [], 0, set()
    for tarball in tqdm(tarballs, desc='converting', unit='ckpt', file=sys.stderr, dynamic_ncols=True):
        try:
            r = convert(tarball, template, make_dirs=True, **kwargs)
            if r.output in written:  # only reachable with --force: without it the second one finds the file
                raise WeightsError(f'same variant as an earlier tarball of this batch: replaced its {r.output}')
            written.add(r.output)
            v = r.verify
            rows.append([tarball.name, r.model, 'EMA' if r.ema else 'raw', r.aux_bns,
                         f'{v.max_abs_diff:.1e}' if v else '-', f'{v.top1_agree}/{v.n}' if v else '-',
                         str(r.output)])
        except (AdvPropZooError, OSError) as e:
            failed += 1
            rows.append([tarball.name, '-', '-', '-', '-', '-', f'FAILED: {describe_error(e)}'])
    return rows, failed


# ---------------------------------------------------------------------------------------------------
# command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='tf_to_timm.py',
        description='Convert TF EfficientNet-B0..B8 checkpoints (AdvProp; also baseline, AutoAugment, RandAugment, '
                    'NoisyStudent B-series) to timm safetensors. Writes nothing unless every model tensor is filled '
                    'exactly once from the checkpoint and every weight variable in it is used.')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--checkpoint', metavar='PATH',
                     help='release tarball (.tar.gz/.tgz/.tar), extracted folder, or checkpoint prefix (model.ckpt)')
    src.add_argument('--batch', metavar='DIR',
                     help='convert every tarball in DIR; --output is then a folder that gets '
                          '<model>/model.safetensors per tarball; one progress bar, a summary table at the end')
    p.add_argument('--output', required=True, metavar='OUT',
                   help='output .safetensors file; "{model}" in it is replaced by the model name '
                        '(with --batch: the output folder)')
    p.add_argument('--model', metavar='NAME',
                   help='efficientnet_bX_advprop or tf_efficientnet_bX, optionally with a timm pretrained tag '
                        '(tf_efficientnet_b3.aa_in1k) whose config (mean/std, crop) --config records; '
                        'default: inferred from the scope name (efficientnet-bN) and the shapes')
    p.add_argument('--family', choices=sorted(FAMILIES), default='advprop',
                   help='name given to an inferred model: advprop -> efficientnet_bN_advprop (mean = std = 0.5), '
                        'tf -> tf_efficientnet_bN (for the baseline/AutoAugment/RandAugment/NoisyStudent releases); '
                        'default: %(default)s')
    p.add_argument('--no-ema', action='store_true',
                   help='convert the raw weights instead of their ExponentialMovingAverage twins '
                        '(the release evaluates with the EMA twins)')
    p.add_argument('--verify', action='store_true',
                   help='load the same TF variables into Keras\'s own EfficientNet, feed both the same '
                        'deterministic [-1, 1] input (2 images at the model\'s resolution), and write nothing if '
                        'max |logit difference| > 1e-4 or the top-1 classes differ')
    p.add_argument('--config', action='store_true',
                   help='also write timm\'s config.json beside the output (with the output, a timm local-dir: folder '
                        'when the output is named model.safetensors)')
    p.add_argument('--force', action='store_true', help='overwrite existing output files')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch and args.model:
        parser.error('--model names one checkpoint\'s model; --batch infers each tarball\'s (see --family)')
    kwargs = dict(model=args.model, use_ema=not args.no_ema, verify=args.verify, config=args.config,
                  force=args.force, family=args.family)
    def run() -> int:
        if args.batch:
            rows, failed = convert_batch(args.batch, args.output, **kwargs)
            print(format_table(['tarball', 'model', 'weights', 'aux BNs', 'max |Δlogit|', 'top-1 agree', 'output'],
                               rows, align='lllrrrl'))
            if failed:
                print(f'tf_to_timm.py: error: {failed} of {len(rows)} tarballs failed', file=sys.stderr)
                return 1
            return 0
        result = convert(args.checkpoint, args.output, **kwargs)
        print('\n'.join(result.lines()))
        return 0

    return run_command('tf_to_timm.py', run)

if __name__ == '__main__':
    sys.exit(main())
