"""Evaluation results: the JSON file, its Markdown tables, side-by-side comparison and plots.

The JSON is the hand-off to everything downstream (model cards, comparisons), so its shape is fixed
and versioned (``schema``) and every number sits in one flat ``metrics`` map (name -> number) as well
as in the detailed ``results``. Schema ``advprop-zoo-eval/1``::

    schema        "advprop-zoo-eval/1"
    model         timm model name;  num_classes;  param_count (the model's parameters as loaded, unfused)
    weights       {source: "pretrained" | "checkpoint", location: hub repo id or file, sha256: hex or null}
    dataset       imagenet | imagenet-c | imagenet-a | stylized | folder, or a timm dataset spec
                  (hfds/NAME, hfids/NAME, wds/NAME, tfds/NAME, torch/NAME);  data_dir (null: a timm spec
                  read without one, e.g. hfds/ from the Hugging Face cache)
    data_config   timm's resolve_data_config: input_size, interpolation, mean, std, crop_pct, crop_mode
                  (the model's own, or as --input-size / --crop-pct / --interpolation / --mean / --std set them)
    settings      batch_size, device, amp, channels_last, fused, seed, attack ({kind, eps, steps,
                  targeted} or null; kind as given, e.g. "pgd" or "pgd,autoattack"), corruptions (imagenet-c),
                  clean_dir, use_ema (the checkpoint's EMA weights), split, class_map, input_img_mode,
                  num_samples (the first N images of every set), autoattack ({version, eps, norm, attacks,
                  seed} or null),
                  protocol ("robustbench" or null), bn_route ("main" | "aux" | "both")
    versions      advprop_zoo, timm, torch (pyautoattack when AutoAttack ran);  created (UTC, ISO 8601)
    metrics       flat {name: number}: <set>_top1 / _top5 (set = imagenet, imagenet_a, stylized, folder;
                  a timm dataset spec, labelled by its own classes as folder is, reports as folder),
                  <set>_<attack>_top1 / _top5 (attack e.g. pgd5_eps4, fgsm_eps1, pgd3_eps2_targeted),
                  <set>_<aa>_top1: AutoAttack's robust accuracy (aa = autoattack_eps4 for the standard
                  version, autoattack_plus_eps4, autoattack_rand_eps4, autoattack_custom_eps4; top-1 only),
                  <set>_<aa>_<attack>_top1: the robust accuracy after each attack of its ensemble, in
                  AutoAttack's names (e.g. imagenet_autoattack_eps4_apgd-ce_top1, ..._apgd-t_top1,
                  ..._fab-t_top1, ..._square_top1; the last equals <set>_<aa>_top1),
                  imagenet_c_mce, imagenet_c_relative_mce, imagenet_c_error_<c>, imagenet_c_ce_<c>;
                  the auxiliary-BN route's numbers (bn_route aux / both) are the same names prefixed
                  aux_ (aux_imagenet_top1, aux_imagenet_autoattack_eps4_top1, aux_imagenet_c_mce, ...)
    results       clean {top1, top5, images, images_per_s, excluded}; robust [{name, kind, eps, steps,
                  step_size, targeted, top1, top5, images, images_per_s, excluded}]; autoattack [{name,
                  version, eps, norm, attacks [{name, top1 (robust accuracy after it), broken (indices of
                  the images it broke), seconds}], images, clean_top1, top1, robust (indices still robust),
                  seconds, images_per_s, excluded}]; imagenet_c (see imagenet_c_summary, plus images and
                  excluded); aux: the same keys for the auxiliary-BN route (bn_route aux: only aux);
                  autoattack_images: the files AutoAttack's indices point into (index = place in the run's
                  order: the dataset's, or RobustBench's list), relative to data_dir; protocol (robustbench:
                  {name, list, listed, found, missing})

Accuracies, errors, CE and mCE are percentages (AlexNet's mCE = 100); eps is in 0-255 pixel units.
``images`` counts the images evaluated; ``excluded`` lists the files that could not be read (a truncated
JPEG, a non-image under an image name), relative to the run's folder (ImageNet-C: to ``data_dir``),
which no number counts. Files written before ``excluded`` existed lack it: read it as ``[]``; files written
before ``param_count`` and the settings from use_ema on lack those.

``--results-file`` writes the same run as timm's validate.py writes its results file (``results_csv_row``): a
CSV with a header and one row, validate.py's columns ``model, top1, top1_err, top5, top5_err, param_count (M),
img_size, crop_pct, interpolation``, and where validate.py puts its extra metrics (after ``top5_err``) one
``<attack>_top1`` / ``<attack>_top5`` pair per attack run, ``<aa>_top1`` per AutoAttack run, or ImageNet-C's
``mce`` and ``relative_mce``; the auxiliary-BN route's as ``aux_``-prefixed columns after them.
"""
import csv
import importlib.util
import io
import datetime
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..table import format_table
from ..weights import atomic_write

__all__ = ['SCHEMA', 'metrics_of', 'metric_prefix', 'describe_metric', 'autoattack_name', 'AUX_PREFIX',
           'write_results', 'read_results', 'format_results', 'compare_results', 'plot_results', 'check_plotting',
           'plotting_available', 'results_csv_row', 'write_results_csv']

SCHEMA = 'advprop-zoo-eval/1'
_PREFIX = {'imagenet': 'imagenet', 'imagenet-a': 'imagenet_a', 'stylized': 'stylized', 'folder': 'folder',
           'imagenet-c': 'imagenet_c'}


# metric-name prefix -> the dataset's display name (longest prefix first: imagenet_c before imagenet)
_SET_NAMES = (('imagenet_c', 'ImageNet-C'), ('imagenet_a', 'ImageNet-A'), ('imagenet', 'ImageNet'),
              ('stylized', 'Stylized-ImageNet'), ('folder', 'folder'))
_ATTACK_NAME = re.compile(r'([a-z]+?)(\d*)_eps(\d+(?:\.\d+)?)(_targeted)?')
_AA_NAME = re.compile(r'autoattack(?:_(plus|rand|custom))?_eps(\d+(?:\.\d+)?)(?:_([a-z]+(?:-[a-z]+)?))?')
_AA_LABELS = {'apgd-ce': 'APGD-CE', 'apgd-dlr': 'APGD-DLR', 'apgd-t': 'APGD-T', 'fab': 'FAB', 'fab-t': 'FAB-T',
              'square': 'Square'}
AUX_PREFIX = 'aux_'  # metric-name prefix of the auxiliary-BN route's numbers


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat().replace('+00:00', 'Z')


def attack_name(kind: str, eps: float, steps: int, targeted: bool) -> str:
    """Metric-name form of an attack: ``pgd5_eps4``, ``fgsm_eps1``, ``pgd3_eps2_targeted``."""
    return f'{kind}{steps if kind == "pgd" else ""}_eps{eps:g}' + ('_targeted' if targeted else '')


def autoattack_name(version: str, eps: float) -> str:
    """Metric-name form of an AutoAttack run: ``autoattack_eps4`` (standard), ``autoattack_plus_eps4``, ..."""
    return f'autoattack{"" if version == "standard" else "_" + version}_eps{eps:g}'


def metric_prefix(dataset: str) -> str:
    """The metric-name prefix of a run's clean and robust numbers: the benchmark's (``imagenet``,
    ``imagenet_a``, ...; ImageNet-C's clean run: ``imagenet``), ``folder`` for a timm dataset spec
    (``hfds/NAME``, ...), which is labelled by its own classes as a folder is."""
    if dataset == 'imagenet-c':
        return 'imagenet'
    return _PREFIX.get(dataset, 'folder')


def metrics_of(report: Mapping[str, Any]) -> Dict[str, float]:
    """The flat ``{name: number}`` view of a report's ``results`` (what ``metrics`` holds): the main route's
    numbers, then the auxiliary-BN route's (``results['aux']``) under the ``aux_`` prefix."""
    res, out = report['results'], {}
    clean_set = metric_prefix(report['dataset'])
    out.update(_route_metrics(res, clean_set))
    if res.get('aux'):
        out.update({AUX_PREFIX + k: v for k, v in _route_metrics(res['aux'], clean_set).items()})
    return out


def _route_metrics(res: Mapping[str, Any], clean_set: str) -> Dict[str, float]:
    out: Dict[str, float] = {}
    if res.get('clean'):
        out[f'{clean_set}_top1'] = res['clean']['top1']
        out[f'{clean_set}_top5'] = res['clean']['top5']
    for r in res.get('robust') or []:
        out[f'{clean_set}_{r["name"]}_top1'] = r['top1']
        out[f'{clean_set}_{r["name"]}_top5'] = r['top5']
    for r in res.get('autoattack') or []:
        out[f'{clean_set}_{r["name"]}_top1'] = r['top1']
        for a in r['attacks']:
            out[f'{clean_set}_{r["name"]}_{a["name"]}_top1'] = a['top1']
    c = res.get('imagenet_c')
    if c:
        for key in ('mce', 'relative_mce'):
            if c.get(key) is not None:
                out[f'imagenet_c_{key}'] = c[key]
        for name, row in c['corruptions'].items():
            out[f'imagenet_c_error_{name}'] = row['error']
            if row.get('ce') is not None:
                out[f'imagenet_c_ce_{name}'] = row['ce']
    return out


def _attack_label(name: str) -> str:
    """'pgd5_eps4' -> 'PGD-5 eps 4', 'fgsm_eps1' -> 'FGSM eps 1', 'autoattack_eps4' -> 'AutoAttack eps 4',
    'autoattack_plus_eps4_apgd-ce' -> 'AutoAttack+ eps 4 after APGD-CE'; an unknown form stays as it is."""
    m = _AA_NAME.fullmatch(name)
    if m:
        version, eps, after = m.groups()
        suffix = {'plus': '+', 'rand': ' rand', 'custom': ' custom'}.get(version or '', '')
        if after and after not in _AA_LABELS:
            return name
        return f'AutoAttack{suffix} eps {eps}' + (f' after {_AA_LABELS[after]}' if after else '')
    m = _ATTACK_NAME.fullmatch(name)
    if not m:
        return name
    kind, steps, eps, targeted = m.groups()
    return f'{kind.upper()}{"-" + steps if steps else ""} eps {eps}{" targeted" if targeted else ""}'


def describe_metric(name: str) -> Tuple[str, str, bool]:
    """``(dataset, label, per_corruption)`` of a ``metrics`` name, for tables and model cards:
    ``imagenet_pgd5_eps4_top1`` -> ``('ImageNet', 'PGD-5 eps 4 top-1', False)``,
    ``imagenet_autoattack_eps4_apgd-ce_top1`` -> ``('ImageNet', 'AutoAttack eps 4 after APGD-CE top-1', False)``,
    ``imagenet_c_ce_fog`` -> ``('ImageNet-C', 'fog CE', True)``; the auxiliary-BN route's ``aux_`` names get
    ``' (aux BNs)'`` after the label; a name of another form is ``('-', name, False)``."""
    if name.startswith(AUX_PREFIX):
        dataset, label, per = describe_metric(name[len(AUX_PREFIX):])
        return (dataset, f'{label} (aux BNs)', per) if dataset != '-' else ('-', name, False)
    m = re.fullmatch(r'imagenet_c_(error|ce)_(.+)', name)
    if m:
        return 'ImageNet-C', f'{m.group(2)} {"mean error" if m.group(1) == "error" else "CE"}', True
    if name in ('imagenet_c_mce', 'imagenet_c_relative_mce'):
        return 'ImageNet-C', 'mCE' if name == 'imagenet_c_mce' else 'relative mCE', False
    for prefix, dataset in _SET_NAMES:
        rest = name[len(prefix) + 1:] if name.startswith(prefix + '_') else ''
        m = re.fullmatch(r'(?:(.+)_)?top([15])', rest)
        if m:
            label = f'top-{m.group(2)}' if not m.group(1) else f'{_attack_label(m.group(1))} top-{m.group(2)}'
            return dataset, label, False
    return '-', name, False


def write_results(report: Mapping[str, Any], path: os.PathLike) -> Path:
    """Write a report as JSON, atomically (a reader sees the old file or the whole new one)."""
    text = json.dumps(report, indent=2, allow_nan=False) + '\n'
    with atomic_write(path, 'w') as f:
        f.write(text)
    return Path(path)


def results_csv_row(report: Mapping[str, Any]) -> Dict[str, Any]:
    """The report as the one row timm's validate.py writes to its ``--results-file``: its columns and
    rounding (accuracies to 4 decimals, ``param_count`` in millions to 2), empty where a run measured no
    clean accuracy (ImageNet-C without --clean-dir); attack runs and ImageNet-C's mCE as extra columns
    after ``top5_err``, where validate.py puts its own extra metrics."""
    res, cfg = report['results'], report['data_config']
    clean = res.get('clean')

    def r4(v: Optional[float]) -> Any:
        return '' if v is None else round(v, 4)
    row: Dict[str, Any] = {'model': report['model']}
    for k in ('top1', 'top5'):
        row[k] = r4(clean[k]) if clean else ''
        row[f'{k}_err'] = r4(100 - clean[k]) if clean else ''
    for prefix, route in (('', res), (AUX_PREFIX, res.get('aux') or {})):
        if prefix and route.get('clean'):
            row[f'{prefix}top1'], row[f'{prefix}top5'] = r4(route['clean']['top1']), r4(route['clean']['top5'])
        for r in route.get('robust') or []:
            row[f"{prefix}{r['name']}_top1"], row[f"{prefix}{r['name']}_top5"] = r4(r['top1']), r4(r['top5'])
        for r in route.get('autoattack') or []:
            row[f"{prefix}{r['name']}_top1"] = r4(r['top1'])
        c = route.get('imagenet_c')
        if c:
            row[f'{prefix}mce'], row[f'{prefix}relative_mce'] = r4(c.get('mce')), r4(c.get('relative_mce'))
    count = report.get('param_count')
    row['param_count'] = round(count / 1e6, 2) if count is not None else ''
    row['img_size'] = cfg['input_size'][-1]
    row['crop_pct'] = cfg['crop_pct']
    row['interpolation'] = cfg['interpolation']
    return row


def write_results_csv(report: Mapping[str, Any], path: os.PathLike) -> Path:
    """``--results-file``: ``results_csv_row`` as a CSV (header + row, Python's csv dialect as validate.py
    writes it), atomically."""
    row = results_csv_row(report)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(row))
    writer.writeheader()
    writer.writerow(row)
    with atomic_write(path, 'w') as f:
        f.write(buf.getvalue())
    return Path(path)


def read_results(path: os.PathLike) -> Dict[str, Any]:
    """Load a results JSON written by ``advprop-zoo eval``; ValueError with the reason if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: no such results file')
    try:
        report = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f'{path}: not a JSON file ({e})') from None
    if not isinstance(report, dict) or report.get('schema') != SCHEMA:
        raise ValueError(f'{path}: not an advprop-zoo eval results file (schema {SCHEMA!r} expected)')
    if not isinstance(report.get('metrics'), dict):
        raise ValueError(f'{path}: {SCHEMA} file without its metrics map')
    return report


def _routes(res: Mapping[str, Any]) -> List[Tuple[str, Mapping[str, Any]]]:
    """``[(route, results)]``: the main route's results (the top level, when it was evaluated) and the
    auxiliary-BN route's (``results['aux']``)."""
    out = []
    if any(res.get(k) for k in ('clean', 'robust', 'autoattack', 'imagenet_c')):
        out.append(('main', res))
    if res.get('aux'):
        out.append(('aux', res['aux']))
    return out


def format_results(report: Mapping[str, Any]) -> str:
    """Markdown tables of one report: headline numbers, the attack sweep, AutoAttack per attack of its ensemble,
    the ImageNet-C breakdown; with the auxiliary-BN route (``--bn-route aux|both``) a first ``BNs`` column says
    which BNs each row went through (``both``: two rows per number). When unreadable files were left out, an
    ``excluded`` column with their count and a line naming them."""
    res = report['results']
    w = report['weights']
    sha = (w.get('sha256') or '')[:12] or 'unknown'
    where = f" ({report['data_dir']})" if report.get('data_dir') else ''
    parts = [f"{report['model']} on {report['dataset']}{where}; weights {w['location']} "
             f"(sha256 {sha}); input {'x'.join(map(str, report['data_config']['input_size']))}, "
             f"{report['data_config']['interpolation']}, crop {report['data_config']['crop_pct']:.3f}, "
             f"mean {_v(report['data_config'].get('mean'))} std {_v(report['data_config'].get('std'))}"]
    routes = _routes(res)
    show_route = any(r == 'aux' for r, _ in routes)
    rcol = (lambda route: [route]) if show_route else (lambda route: [])
    rhead = ['BNs'] if show_route else []
    runs = []
    for _, rr in routes:
        runs += ([rr['clean']] if rr.get('clean') else []) + list(rr.get('robust') or []) \
            + list(rr.get('autoattack') or []) + ([rr['imagenet_c']] if rr.get('imagenet_c') else [])
    show_excluded = any(r.get('excluded') for r in runs)
    excluded_column = (lambda r: [len(r.get('excluded') or [])]) if show_excluded else (lambda r: [])
    clean_set = 'imagenet (clean)' if report['dataset'] == 'imagenet-c' else report['dataset']
    rows = [rcol(route) + [clean_set, c['images'], _p(c['top1']), _p(c['top5']), f"{c['images_per_s']:.1f}"]
            + excluded_column(c) for route, rr in routes if (c := rr.get('clean'))]
    if rows:
        parts.append(format_table(rhead + ['set', 'images', 'top-1', 'top-5', 'img/s'] + ['excluded'] * show_excluded,
                                  rows))
    rows = [rcol(route) + [r['name'], f"{r['eps']:g}", r['steps'], _p(r['top1']), _p(r['top5']),
                           f"{r['images_per_s']:.1f}"] + excluded_column(r)
            for route, rr in routes for r in rr.get('robust') or []]
    if rows:
        parts.append(format_table(rhead + ['attack', 'eps (px)', 'steps', 'top-1', 'top-5', 'img/s']
                                  + ['excluded'] * show_excluded, rows))
    aa_runs = [(route, r) for route, rr in routes for r in rr.get('autoattack') or []]
    if aa_runs:
        names = list(dict.fromkeys(a['name'] for _, r in aa_runs for a in r['attacks']))
        rows = []
        for route, r in aa_runs:
            after = {a['name']: a for a in r['attacks']}
            rows.append(rcol(route) + [r['name'], f"{r['eps']:g}", r['images'], _p(r['clean_top1'])]
                        + [f"{_p(after[n]['top1'])} (-{len(after[n]['broken'])})" if n in after else '-'
                           for n in names]
                        + [_p(r['top1']), f"{r['images_per_s']:.2f}"] + excluded_column(r))
        parts.append(format_table(rhead + ['autoattack', 'eps (px)', 'images', 'clean']
                                  + [f'after {_AA_LABELS.get(n, n)}' for n in names]
                                  + ['robust top-1', 'img/s'] + ['excluded'] * show_excluded, rows))
        first = aa_runs[0][1]
        version = (report.get('versions') or {}).get('pyautoattack')
        parts.append(f"AutoAttack {first['version']} (pyautoattack {version or '?'}): L-inf eps/255 on images in "
                     "[0, 1], each attack on the images still robust; (-n) = images it broke (their indices: "
                     "the results JSON)")
    for route, rr in routes:
        c = rr.get('imagenet_c')
        if not c:
            continue
        rows = []
        for name, row in c['corruptions'].items():
            rows.append([name] + [_p(row['errors'][str(s)]) for s in range(1, 6)]
                        + [_p(row['error']), _p(row['ce']), _p(row['relative_ce'])])
        if show_route:
            parts.append(f'ImageNet-C through the {route} BNs:')
        parts.append(format_table(['corruption', 'err s1', 's2', 's3', 's4', 's5', 'mean err', 'CE', 'rel. CE'], rows))
        mce = _p(c['mce']) if c['mce'] is not None else 'n/a (needs all 15 corruptions)'
        rel = (_p(c['relative_mce']) if c['relative_mce'] is not None
               else 'n/a (needs all 15 corruptions and the clean error: --clean-dir)')
        parts.append(f'mCE {mce}; relative mCE {rel} (AlexNet = 100; lower is better)')
    protocol = res.get('protocol')
    if protocol:
        missing = protocol.get('missing') or []
        parts.append(f"RobustBench ImageNet L-inf: {protocol['found']} of the {protocol['listed']} listed images"
                     + (f"; {len(missing)} not in the folder (e.g. {missing[0]})" if missing else ''))
    if show_excluded:
        parts.append(_excluded_line(runs))
    return '\n\n'.join(parts)


_NAMED = 20  # excluded files named in the printed report; the JSON lists them all


def _excluded_line(runs: Sequence[Mapping[str, Any]]) -> str:
    """One line naming the unreadable files the runs left out (each once: every attack run reads the same files)."""
    names = list(dict.fromkeys(n for r in runs for n in r.get('excluded') or []))
    shown = ', '.join(names[:_NAMED]) + (f' and {len(names) - _NAMED} more (all in the results JSON)'
                                          if len(names) > _NAMED else '')
    return (f'excluded {len(names)} unreadable file{"s" if len(names) != 1 else ""} (not counted in any number): '
            f'{shown}')


def _v(values: Optional[Sequence[float]]) -> str:
    return '-' if values is None else '(' + ', '.join(f'{v:g}' for v in values) + ')'


def _p(value: Optional[float]) -> str:
    return '-' if value is None else f'{value:.2f}'


def _lower_is_better(metric: str) -> bool:
    return metric.startswith(('imagenet_c_', AUX_PREFIX + 'imagenet_c_'))  # errors, CE, mCE


def compare_results(reports: Sequence[Mapping[str, Any]], labels: Optional[Sequence[str]] = None) -> str:
    """Side-by-side metrics of two or more reports with deltas against the first (e.g. vanilla vs
    AdvProp, as the paper's robustness table), as a Markdown table; mCE-like rows are lower-is-better."""
    if len(reports) < 2:
        raise ValueError('compare needs at least two results files')
    labels = list(labels) if labels else [r['model'] for r in reports]
    names: List[str] = []
    for r in reports:
        names += [m for m in r['metrics'] if m not in names]
    base = reports[0]['metrics']
    headers = ['metric'] + [labels[0]]
    for label in labels[1:]:
        headers += [label, 'Δ']
    rows = []
    for m in names:
        row: List[Any] = [m + (' (↓)' if _lower_is_better(m) else ''), _p(base.get(m))]
        for r in reports[1:]:
            v = r['metrics'].get(m)
            row += [_p(v), '-' if v is None or base.get(m) is None else f'{v - base[m]:+.2f}']
        rows.append(row)
    header_lines = [f'{lab}: {r["model"]} on {r["dataset"]}, weights {(r["weights"].get("sha256") or "unknown")[:12]}'
                    for lab, r in zip(labels, reports)]
    return '\n'.join(header_lines) + '\n\n' + format_table(headers, rows, align='l' + 'r' * (len(headers) - 1))


def plotting_available() -> bool:
    """Whether matplotlib (the optional plotting dependency) is installed, without importing it."""
    return importlib.util.find_spec('matplotlib') is not None


def check_plotting() -> None:
    """Fail now, before any evaluation, if matplotlib (the optional plotting dependency) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError('--plot needs matplotlib, which is not installed: pip install matplotlib '
                         '(or pip install "advprop-zoo[train]")') from None


def plot_results(report: Mapping[str, Any], path: os.PathLike) -> Path:
    """Robustness curves: accuracy vs eps (eps 0 = clean) for each attack family run (PGD / FGSM top-1, and
    top-5 when it is the only curve; AutoAttack's robust top-1), per BN route (aux dashed); or CE per
    corruption for ImageNet-C. PNG/PDF/SVG by ``path``'s suffix, written atomically. Uses matplotlib's object
    API (no pyplot, no display needed)."""
    check_plotting()
    from matplotlib.figure import Figure
    res = report['results']
    fig = Figure(figsize=(7, 4.2), layout='constrained')
    ax = fig.add_subplot()
    routes = _routes(res)
    curves = []  # (label, xs, ys, style)
    for route, rr in routes:
        clean = rr.get('clean')
        families: Dict[str, List[Mapping[str, Any]]] = {}
        for r in rr.get('robust') or []:
            families.setdefault(_attack_label(r['name']).split(' eps ')[0], []).append(r)
        for r in rr.get('autoattack') or []:
            families.setdefault(_attack_label(r['name']).split(' eps ')[0], []).append(r)
        for family, sweep in families.items():
            sweep = sorted(sweep, key=lambda r: r['eps'])
            is_aa = family.startswith('AutoAttack')
            keys = ['top1'] + (['top5'] if not is_aa and len(routes) == 1 and len(families) == 1 else [])
            for k in keys:
                if is_aa:
                    xs, ys = [0.0] + [r['eps'] for r in sweep], [sweep[0]['clean_top1']] + [r['top1'] for r in sweep]
                else:
                    xs = ([0.0] if clean else []) + [r['eps'] for r in sweep]
                    ys = ([clean[k]] if clean else []) + [r[k] for r in sweep]
                label = f"{family} {k.replace('top', 'top-')}" + (' (aux BNs)' if route == 'aux' else '')
                curves.append((label, xs, ys, '--' if route == 'aux' else '-'))
    if curves:
        for label, xs, ys, style in curves:
            ax.plot(xs, ys, marker='o', ls=style, label=label)
        ax.set_xlabel('eps (0-255 pixel units, L-inf)')
        ax.set_ylabel('accuracy (%)')
        ax.set_ylim(0, 101)
        ax.set_title(f"{report['model']}: robust accuracy on {report['dataset']}")
        ax.grid(alpha=0.3)
        ax.legend()
    elif any(rr.get('imagenet_c') for _, rr in routes):
        ce_routes = [(route, rr['imagenet_c']) for route, rr in routes if rr.get('imagenet_c')]
        width = 0.8 / len(ce_routes)
        for k, (route, c) in enumerate(ce_routes):
            rows = [(n, r['ce'] if r['ce'] is not None else r['error']) for n, r in c['corruptions'].items()]
            xs = [i + (k - (len(ce_routes) - 1) / 2) * width for i in range(len(rows))]
            suffix = f' ({route} BNs)' if len(ce_routes) > 1 or route == 'aux' else ''
            ax.bar(xs, [v for _, v in rows], width=width, color=('tab:blue', 'tab:orange')[k % 2],
                   label=f'CE{suffix}' if suffix else None)
            if c['mce'] is not None:
                ax.axhline(c['mce'], color=('tab:red', 'tab:purple')[k % 2], lw=1.5,
                           label=f"mCE {c['mce']:.1f}{suffix}")
        ax.set_xticks(range(len(rows)), [n.replace('_', ' ') for n, _ in rows], rotation=60, ha='right')
        ax.axhline(100, color='gray', lw=1, ls='--', label='AlexNet (CE = 100)')
        ax.set_ylabel('corruption error, CE (%; extras: mean error)')
        ax.set_title(f"{report['model']}: ImageNet-C")
        ax.legend()
    else:
        raise ValueError('nothing to plot: --plot needs --attack or --dataset imagenet-c')
    path = Path(path)
    fmt = path.suffix.lstrip('.').lower() or 'png'
    with atomic_write(path) as f:
        fig.savefig(f, format=fmt, dpi=120)
    return path

