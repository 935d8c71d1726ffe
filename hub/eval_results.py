"""The numbers of an evaluation JSON that a model card reports, copied exactly as the file holds them.

A card must never show a number that was not measured, so nothing here computes, rounds or fills in:
each value is the JSON's own, and anything that is not a metric (timings, image counts, settings) is
left out.

Files written by ``advprop-zoo eval --output`` (``"schema": "advprop-zoo-eval/N"``) are read by the
library's own reader (``advprop_zoo.eval.results.read_results``) and labelled by its ``describe_metric``:
their flat ``metrics`` map is the schema's hand-off to downstream consumers such as this card, plus
``model``, ``num_classes``, ``weights.sha256``, ``dataset`` and ``data_config``. A metric name the
library does not know is still shown, under its own name.

Any other JSON is read defensively from a small documented subset (keys case-insensitive, ``-`` and
``_`` alike): ``model`` and the weights' ``sha256`` (``weights_sha256``, ``sha256``, or
``weights: {sha256}``); ``dataset``; ``top1`` / ``top5`` (also ``acc1``/``acc5``), directly or under
``clean``; ``mce`` and ``relative_mce``; robust accuracy per eps under ``robust`` (or ``robustness``,
``adversarial``, ``attacks``, ``pgd``, ``fgsm``) as ``{eps: top1}``, ``{eps: {top1}}``, grouped by attack
name, or a list of ``{attack, eps, steps, top1}``; several datasets as a top-level list or under
``results`` / ``metrics`` / ``datasets`` (a list, or ``{dataset: {...}}``).
"""
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from advprop_zoo.eval.results import describe_metric, read_results

from hub import PublishError

__all__ = ['Metric', 'EvalResults', 'read_eval_results']

_TOP1 = ('top1', 'acc1', 'top1_acc', 'top1_accuracy', 'accuracy', 'acc')
_TOP5 = ('top5', 'acc5', 'top5_acc', 'top5_accuracy')
_MCE = ('mce',)
_REL_MCE = ('relative_mce', 'rel_mce', 'mce_relative')
_ROBUST = ('robust', 'robustness', 'adversarial', 'attacks', 'robust_accuracy')
_NESTED = ('results', 'metrics', 'datasets')
_ATTACKS = ('pgd', 'fgsm')
_SHA = ('weights_sha256', 'sha256', 'weights_hash', 'checkpoint_sha256')
_EPS = re.compile(r'(?:eps(?:ilon)?[=_ ]?)?(\d+(?:\.\d+)?)')


SCHEMA_PREFIX = 'advprop-zoo-eval/'  # any version of the library's schema goes to its reader, which names it


@dataclass(frozen=True)
class Metric:
    """One number for the card: where it was measured, what it is, and the JSON's value unchanged."""
    dataset: str
    name: str
    value: Union[int, float]
    key: Optional[str] = None  # the file's own metric name, where it has one
    per_corruption: bool = False  # one of ImageNet-C's per-corruption numbers (a table of their own)


@dataclass
class EvalResults:
    path: Path
    schema: Optional[str] = None
    model: Optional[str] = None
    num_classes: Optional[int] = None
    weights_sha256: Optional[str] = None
    dataset: Optional[str] = None
    data_config: Dict[str, Any] = field(default_factory=dict)
    metrics: List[Metric] = field(default_factory=list)


def _norm(key: Any) -> str:
    return str(key).strip().lower().replace('-', '_')


def _get(obj: Mapping[str, Any], names: Tuple[str, ...]) -> Any:
    for key, value in obj.items():
        if _norm(key) in names:
            return value
    return None


def _number(value: Any) -> Optional[Union[int, float]]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _name(value: Any) -> Optional[str]:
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, Mapping):
        return _name(value.get('name'))
    return None


def _eps_of(key: Any) -> Optional[str]:
    """1, '1', '1.0', 'eps1', 'eps=4' -> the eps as the JSON wrote it; anything else is not an eps."""
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        return str(key)
    if not isinstance(key, str):
        return None
    m = _EPS.fullmatch(_norm(key))
    return m.group(1) if m else None


def _label(attack: Optional[str], eps: str, steps: Any = None) -> str:
    """'PGD-5 eps 4 top-1': the attack, its steps when the JSON gives them, and the eps as written."""
    name = (attack or 'attack').upper()
    if _number(steps) is not None:
        name += f'-{steps}'
    return f'{name} eps {eps} top-1'


def _robust(obj: Any, dataset: str, attack: Optional[str], steps: Any = None) -> Iterator[Metric]:
    if isinstance(obj, list):  # [{"attack": "pgd", "eps": 1, "steps": 2, "top1": ...}, ...]
        for item in obj:
            if isinstance(item, Mapping):
                eps, value = _eps_of(item.get('eps', item.get('epsilon'))), _number(_get(item, _TOP1))
                if eps is not None and value is not None:
                    yield Metric(dataset, _label(_name(item.get('attack')) or attack, eps,
                                                 item.get('steps', steps)), value)
        return
    if not isinstance(obj, Mapping):
        return
    attack = _name(obj.get('attack')) or attack
    steps = obj.get('steps', steps)
    for key, value in obj.items():
        if _norm(key) in ('attack', 'steps', 'step_size', 'targeted'):
            continue
        eps = _eps_of(key)
        if eps is not None:  # {eps: top1} or {eps: {top1: ...}}
            number = _number(_get(value, _TOP1)) if isinstance(value, Mapping) else _number(value)
            if number is not None:
                at = value.get('steps', steps) if isinstance(value, Mapping) else steps
                yield Metric(dataset, _label(attack, eps, at), number)
        elif isinstance(value, (Mapping, list)):  # grouped by attack name: {"pgd": {...}, "fgsm": {...}}
            yield from _robust(value, dataset, str(key), steps)


def _collect(obj: Any, dataset: str) -> Iterator[Metric]:
    if isinstance(obj, list):
        for item in obj:
            yield from _collect(item, dataset)
        return
    if not isinstance(obj, Mapping):
        return
    dataset = _name(_get(obj, ('dataset',))) or dataset
    if _get(obj, ('eps', 'epsilon')) is not None:  # one robust entry: its top1 is under attack, not clean
        yield from _robust([obj], dataset, _name(_get(obj, ('attack',))))
        return
    for names, label in ((_TOP1, 'top-1'), (_TOP5, 'top-5'), (_MCE, 'mCE'), (_REL_MCE, 'relative mCE')):
        value = _number(_get(obj, names))
        if value is not None:
            yield Metric(dataset, label, value)
    clean = _get(obj, ('clean',))
    if isinstance(clean, Mapping):
        for names, label in ((_TOP1, 'top-1'), (_TOP5, 'top-5')):
            value = _number(_get(clean, names))
            if value is not None:
                yield Metric(dataset, label, value)
    robust = _get(obj, _ROBUST)
    if robust is not None:
        yield from _robust(robust, dataset, _name(_get(obj, ('attack',))))
    for key, value in obj.items():  # {"pgd": {eps: top1}} beside the clean numbers
        if _norm(key) in _ATTACKS:
            yield from _robust(value, dataset, str(key))
    nested = _get(obj, _NESTED)
    if isinstance(nested, list):
        yield from _collect(nested, dataset)
    elif isinstance(nested, Mapping):
        if any(isinstance(v, (Mapping, list)) for v in nested.values()):
            for key, value in nested.items():  # {dataset: {...}}, or one dataset's clean / attack results
                if _norm(key) in _ATTACKS:
                    yield from _robust(value, dataset, str(key))
                elif _norm(key) not in _ROBUST and isinstance(value, (Mapping, list)):
                    yield from _collect(value, dataset if _norm(key) == 'clean' else str(key))
        else:
            yield from _collect(nested, dataset)


def _schema_metrics(path: Path) -> Iterator[Metric]:
    """The flat ``metrics`` map of an ``advprop-zoo eval`` file, read by the library's own reader, in its
    order, with the library's labels."""
    try:
        report = read_results(path)
    except ValueError as e:
        raise PublishError(str(e)) from None
    for key, value in report['metrics'].items():
        value = _number(value)
        if value is not None:
            dataset, label, per_corruption = describe_metric(key)
            yield Metric(dataset, label, value, key, per_corruption)


def _sha256(obj: Mapping[str, Any]) -> Optional[str]:
    value = _get(obj, _SHA)
    if value is None and isinstance(_get(obj, ('weights',)), Mapping):
        value = _get(_get(obj, ('weights',)), ('sha256', 'hash'))
    if isinstance(value, str) and re.fullmatch(r'[0-9a-fA-F]{64}', value.strip()):
        return value.strip().lower()
    return None


def read_eval_results(path: Union[str, os.PathLike]) -> EvalResults:
    """Read the documented subset of an evaluation JSON; fail in one line if it holds none of it."""
    path = Path(path)
    if not path.is_file():
        raise PublishError(f'{path}: no such evaluation results file')
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PublishError(f'{path}: not valid JSON ({e})') from None
    results = EvalResults(path)
    head = data if isinstance(data, Mapping) else {}
    results.model = _name(_get(head, ('model', 'model_name')))
    results.weights_sha256 = _sha256(head)
    results.dataset = _name(_get(head, ('dataset',)))
    classes = head.get('num_classes')
    results.num_classes = classes if isinstance(classes, int) and not isinstance(classes, bool) else None
    if isinstance(head.get('data_config'), Mapping):
        results.data_config = dict(head['data_config'])
    schema = head.get('schema')
    if isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX):
        results.schema = schema
        found = _schema_metrics(path)
    else:
        found = _collect(data, dataset='-')
    seen = set()
    for metric in found:
        if metric not in seen:
            seen.add(metric)
            results.metrics.append(metric)
    if not results.metrics:
        raise PublishError(
            f'{path}: holds none of the metrics a card reports (top1/top5, robust accuracy per eps, mCE; see '
            'hub/eval_results.py); publish without --eval, or pass the JSON that advprop-zoo eval --output wrote')
    return results
