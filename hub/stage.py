"""Stage a Hub repo folder from a weights file, and prove it loads back to the same model.

The folder is what timm's ``push_to_hf_hub`` uploads, made by timm's own ``save_for_hf``
(``config.json`` + ``model.safetensors``), plus the model card. It is written into a temp folder beside
the target and renamed into place only after it passed every check, so a failure at any step leaves no
folder, and an upload can only ever send a folder that timm's ``local-dir:`` loader has turned back into
the source model: the same tensors, the same preprocessing config, the same logits.

``config.json`` names timm's ``tf_efficientnet_bX`` architecture: it has the same keys, shapes and
outputs as ``efficientnet_bX_advprop`` (checked here on every folder), and it lets anyone with plain timm
``create_model('hf-hub:...')`` the repo; the zoo's preprocessing travels in ``pretrained_cfg``.
"""
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import timm
import torch
from safetensors.torch import load_file
from timm.models import get_pretrained_cfg, save_for_hf

from advprop_zoo.efficientnet_advprop import DEFAULT_TAG, ZOO_TAG, AdvPropVariant, get_variant
from advprop_zoo.load import load_model
from advprop_zoo.weights import WeightsError, atomic_write, current_umask, read_safetensors_header, sha256_file

from hub import PublishError
from hub.card import CardInputs, merged_metrics, model_card
from hub.eval_results import EvalResults

__all__ = ['StagedRepo', 'FILES', 'resolve_model', 'check_out_dir', 'stage_repo', 'validate_folder']

FILES = ('README.md', 'config.json', 'model.safetensors')
LOGIT_ATOL = 1e-5  # same weights, same layers: the reload is expected to be exact; this only absorbs kernel noise


@dataclass
class StagedRepo:
    """A checked repo folder, ready for ``upload_folder``."""
    folder: Path
    model_name: str
    architecture: str
    repo_id: str
    num_classes: int
    input_size: Tuple[int, int, int]
    max_abs_diff: float
    metrics: int
    source_sha256: str


def resolve_model(name: str) -> Tuple[AdvPropVariant, str]:
    """The variant and the full ``name.tag`` whose pretrained cfg goes into config.json. Without a tag the
    zoo's own tag (``ap_in1k_zoo``: this project's weights) is used, not timm's hosted default."""
    variant = get_variant(name)  # unknown names fail with close suggestions
    tag = name.split('.', 1)[1] if '.' in name else ZOO_TAG
    if tag not in (DEFAULT_TAG, ZOO_TAG):
        raise PublishError(f'{name}: unknown pretrained tag {tag!r}; use {variant.name}.{ZOO_TAG} '
                           f'or {variant.name}.{DEFAULT_TAG}')
    return variant, f'{variant.name}.{tag}'


def check_out_dir(out: Path) -> None:
    """A staging target must be new or empty: publish.py never mixes its files with others."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PublishError(f'{out}: already exists and is not an empty folder; stage into a new folder')
    if not out.parent.is_dir():
        raise PublishError(f'{out}: its parent folder {out.parent} does not exist')
    if not os.access(out.parent, os.W_OK):
        raise PublishError(f'{out}: cannot write to {out.parent}')


def _load_source(weights: Path, variant: AdvPropVariant, model_name: str) -> Tuple[torch.nn.Module, Dict]:
    """The zoo model holding the weights (``load_model``: head size from the file, a key/shape check that
    names the first misfit, strict load); dual-BN weights are refused, a card describes the plain model."""
    loaded = load_model(model_name, checkpoint=weights)
    if loaded.dual_bn:
        raise WeightsError(
            f'holds {loaded.aux_bn_tensors} auxiliary BN tensors (a dual-BN AdvProp checkpoint); fold them first: '
            f'advprop-zoo fold {weights} folded.safetensors --model {variant.name}')
    state_dict = loaded.model.state_dict()
    return loaded.model, state_dict


def _data_config(model: torch.nn.Module) -> Dict[str, object]:
    cfg = timm.data.resolve_model_data_config(model)
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in cfg.items()}


def validate_folder(folder: Path, source: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> float:
    """Reload ``folder`` with timm's ``local-dir:`` loader and compare it with the source model: every
    tensor, the preprocessing config, and the logits on a fixed input. Returns max |logit difference|."""

    staged = load_file(str(folder / 'model.safetensors'))
    if set(staged) != set(state_dict):
        odd = sorted(set(staged) ^ set(state_dict))
        raise PublishError(f'{folder}: staged weights differ from the source in key {odd[0]!r}')
    for key, tensor in state_dict.items():
        if not torch.equal(staged[key], tensor.to(staged[key].dtype)):
            raise PublishError(f'{folder}: staged tensor {key!r} differs from the source')
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    want, got = _data_config(source), _data_config(loaded)
    if want != got:
        key = next(k for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k))
        raise PublishError(f'{folder}: config.json changes the preprocessing: {key} {got.get(key)!r}, '
                           f'the model has {want.get(key)!r}')
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((2, *want['input_size']), generator=gen) * 2 - 1  # [-1, 1], as the model expects
    with torch.no_grad():
        a, b = source(x), loaded(x)
    diff = (a - b).abs().max().item()
    if not diff <= LOGIT_ATOL or not torch.equal(a.argmax(-1), b.argmax(-1)):
        raise PublishError(f'{folder}: reloaded model disagrees with the source weights '
                           f'(max |logit difference| {diff:.2e} > {LOGIT_ATOL:.0e})')
    return diff


def _check_eval_model(results: EvalResults, variant: AdvPropVariant, weights: Path, num_classes: int) -> None:
    """Numbers on a card must be about this model: refuse results of another variant or head."""
    if results.model:
        base = results.model.split('.', 1)[0]
        if timm.is_model(base) and base not in (variant.name, variant.timm_arch):
            raise PublishError(f'{results.path}: evaluates {results.model}, not {variant.name}; '
                               'pass the results of the weights being published')
    if results.num_classes is not None and results.num_classes != num_classes:
        raise PublishError(f'{results.path}: evaluates a {results.num_classes}-class model; {weights} has '
                           f'{num_classes} classes')


def _check_eval_weights(results: EvalResults, weights: Path, source_sha: str, staged_sha: str) -> None:
    """...and about these weights, where the file records their hash: the file handed in, or the staged
    model.safetensors (what an eval of the published repo hashes; timm re-serialises the same tensors)."""
    if results.weights_sha256 and results.weights_sha256 not in (source_sha, staged_sha):
        raise PublishError(
            f'{results.path}: measured weights with sha256 {results.weights_sha256[:12]}..., but {weights} has '
            f'{source_sha[:12]}...; evaluate this file (advprop-zoo eval --checkpoint {weights}) or publish without '
            '--eval')


def _registered_as(variant: AdvPropVariant, repo_id: str) -> Optional[str]:
    """The zoo name whose pretrained cfg downloads from ``repo_id``, if any (for the card's usage)."""
    for tag in (ZOO_TAG, DEFAULT_TAG):
        name = f'{variant.name}.{tag}'
        if getattr(get_pretrained_cfg(name), 'hf_hub_id', None) == repo_id:
            return name
    return None


def stage_repo(
        weights: os.PathLike,
        model: str,
        repo_id: str,
        out: os.PathLike,
        eval_results: Sequence[EvalResults] = (),
) -> StagedRepo:
    """Write the checked repo folder ``out`` (new or empty) for ``weights`` of ``model``; all or nothing."""

    weights, out = Path(weights), Path(out)
    variant, model_name = resolve_model(model)
    check_out_dir(out)
    try:
        source, state_dict = _load_source(weights, variant, model_name)
        source_meta = (read_safetensors_header(weights).get('__metadata__') or {}) \
            if weights.suffix == '.safetensors' else {}
    except WeightsError as e:
        msg = str(e)
        raise WeightsError(msg if msg.startswith(str(weights)) else f'{weights}: {msg}') from None
    source_sha = sha256_file(weights)
    for results in eval_results:
        _check_eval_model(results, variant, weights, source.num_classes)
    metrics = merged_metrics(eval_results)  # two files disagreeing on one number stop here
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.staging-', dir=out.parent))
    try:
        save_for_hf(source, tmp, safe_serialization=True, model_config={'architecture': variant.timm_arch})
        diff = validate_folder(tmp, source, state_dict)
        staged_sha = sha256_file(tmp / 'model.safetensors')
        for results in eval_results:
            _check_eval_weights(results, weights, source_sha, staged_sha)
        data_config = _data_config(source)
        card = model_card(CardInputs(
            variant=variant, model_name=model_name, architecture=variant.timm_arch, repo_id=repo_id,
            num_classes=source.num_classes, params=sum(p.numel() for p in source.parameters()),
            data_config=data_config, weights_sha256=staged_sha,
            source_sha256=source_sha, source_metadata=dict(source_meta),
            registered_as=_registered_as(variant, repo_id), eval_results=list(eval_results), max_abs_diff=diff))
        with atomic_write(tmp / 'README.md') as f:
            f.write(card.encode('utf-8'))
        mask = current_umask()  # mkdtemp and safetensors make private files; the staged folder is an ordinary one
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        os.replace(tmp, out)  # atomic; replaces an empty folder, refuses one that filled up meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return StagedRepo(out, model_name, variant.timm_arch, repo_id, source.num_classes,
                      tuple(data_config['input_size']), diff, len(metrics), source_sha)
