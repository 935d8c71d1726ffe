"""Publish AdvProp EfficientNet weights to the Hugging Face Hub as timm repos.

    python hub/publish.py --weights b0.safetensors --model efficientnet_b0_advprop \\
        --repo-id advprop-zoo/efficientnet_b0_advprop.ap_in1k_zoo --eval results.json --dry-run --out staged/b0
    python hub/publish.py --weights-dir zoo/            # the nine converted files, zoo/<model>/model.safetensors

Every repo folder is staged and checked (``hub.stage``) before anything is uploaded; ``--dry-run``
stops there and touches no network. A real upload is ``create_repo`` + one ``upload_folder`` commit
per repo, with the token huggingface_hub finds itself.
"""
import argparse
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from tqdm import tqdm

if __package__ in (None, ''):  # run as a script: make the repo root importable for `hub.*`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advprop_zoo.efficientnet_advprop import HUB_ORG, ZOO_TAG, get_variant  # noqa: E402
from advprop_zoo.errors import AdvPropZooError, describe_error, run_command  # noqa: E402
from advprop_zoo.names import UnknownModelError  # noqa: E402
from advprop_zoo.table import format_table  # noqa: E402

from hub import PublishError  # noqa: E402
from hub.eval_results import EvalResults, read_eval_results  # noqa: E402
from hub.stage import FILES, StagedRepo, check_out_dir, stage_repo  # noqa: E402
from hub.upload import check_repo_id, resolve_token, upload_folder  # noqa: E402

__all__ = ['main', 'build_parser', 'find_weights']

PROG = 'publish.py'
BATCH_REPO_ID = f'{HUB_ORG}/{{model}}.{ZOO_TAG}'
WEIGHTS_NAME = 'model.safetensors'


def find_weights(folder: Path) -> Tuple[List[Tuple[str, Path]], List[str]]:
    """``folder/<model>/model.safetensors`` for each zoo model, B0 first (convert's batch layout), and the
    names of the other entries, which are skipped."""
    if not folder.is_dir():
        raise PublishError(f'{folder}: no such folder')
    found, skipped = [], []
    for entry in sorted(folder.iterdir()):
        try:
            variant = get_variant(entry.name)
        except UnknownModelError:
            variant = None
        if variant is not None and entry.name == variant.name and (entry / WEIGHTS_NAME).is_file():
            found.append((variant.level, variant.name, entry / WEIGHTS_NAME))
        elif not entry.name.startswith('.'):
            skipped.append(entry.name)
    if not found:
        raise PublishError(f'{folder}: no <model>/{WEIGHTS_NAME} for any efficientnet_bX_advprop '
                           '(the layout convert/tf_to_timm.py --batch writes)')
    return [(name, path) for _, name, path in sorted(found)], skipped


def _commit_message(args: argparse.Namespace, staged: StagedRepo) -> str:
    return args.commit_message or f'Add {staged.model_name} weights (timm format, AdvProp EfficientNet)'


def _commit_description(staged: StagedRepo) -> str:
    return (f'Staged by advprop-zoo hub/publish.py from weights with sha256 {staged.source_sha256}; reloaded through '
            f"timm's local-dir: loader as {staged.architecture}: tensors identical, max |logit difference| "
            f'{staged.max_abs_diff:.1e}; {staged.metrics} measured metrics in the card.')


def _report(staged: StagedRepo, results: Sequence[EvalResults], kept: bool) -> None:
    where = f'in {staged.folder}' if kept else '(in a temp folder)'
    print(f'staged {staged.model_name} for {staged.repo_id} {where}: {", ".join(FILES)}')
    size = 'x'.join(str(s) for s in staged.input_size[1:])
    print(f"checked: timm.create_model('local-dir:...', pretrained=True) builds {staged.architecture} with the "
          f'source tensors unchanged, {staged.num_classes} classes, max |logit difference| {staged.max_abs_diff:.1e} '
          f'at {size}; preprocessing mean = std = 0.5 kept')
    print(f'card: {staged.metrics} metrics from {", ".join(str(r.path) for r in results)}' if results else
          'card: no metrics table (no --eval given; the card says so)')


def _single(args: argparse.Namespace) -> int:
    repo_id = check_repo_id(args.repo_id)
    token = None if args.dry_run else resolve_token()
    results = [read_eval_results(path) for path in args.eval or ()]
    with tempfile.TemporaryDirectory(prefix='advprop-zoo-publish-') as tmp:
        out = Path(args.out) if args.out else Path(tmp) / 'repo'
        staged = stage_repo(args.weights, args.model, repo_id, out, eval_results=results)
        _report(staged, results, kept=bool(args.out))
        if args.dry_run:
            print('dry run: nothing uploaded')
            return 0
        url = upload_folder(staged.folder, repo_id, token, _commit_message(args, staged), _commit_description(staged),
                            private=args.private, revision=args.revision)
        print(f'uploaded {repo_id}' + (f'@{args.revision}' if args.revision else '') + f' in one commit: {url}')
    return 0


def _batch(args: argparse.Namespace) -> int:
    template = args.repo_id or BATCH_REPO_ID
    models, skipped = find_weights(Path(args.weights_dir))
    # every input is checked before the first (slow) staging: repo ids, token, eval files, output folders
    repo_ids = {name: check_repo_id(template.replace('{model}', name)) for name, _ in models}
    token = None if args.dry_run else resolve_token()
    results = {name: [read_eval_results(t.replace('{model}', name)) for t in args.eval or ()] for name, _ in models}
    root = Path(args.out) if args.out else None
    if root is not None:
        if root.exists() and not root.is_dir():
            raise PublishError(f'{root}: exists and is not a folder')
        for name, _ in models:
            if (root / name).exists():
                check_out_dir(root / name)
    if skipped:
        print(f'skipped (not a zoo model folder with {WEIGHTS_NAME}): {", ".join(skipped)}')

    rows, staged, failed = [], {}, 0
    with tempfile.TemporaryDirectory(prefix='advprop-zoo-publish-') as tmp:
        base = root or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        for name, path in tqdm(models, desc='staging', unit='repo', file=sys.stderr, dynamic_ncols=True):
            try:
                staged[name] = stage_repo(path, name, repo_ids[name], base / name, eval_results=results[name])
            except (AdvPropZooError, OSError) as e:
                failed += 1
                rows.append([name, repo_ids[name], '-', '-', '-', f'FAILED: {describe_error(e)}'])
        uploads = {}
        if not failed and not args.dry_run:
            for name, s in staged.items():
                try:
                    uploads[name] = upload_folder(s.folder, s.repo_id, token, _commit_message(args, s),
                                                  _commit_description(s), private=args.private,
                                                  revision=args.revision)
                except PublishError as e:
                    failed += 1
                    uploads[name] = f'FAILED: {e}'
        for name, s in staged.items():
            result = uploads.get(name) or (str(s.folder) if root else 'staged, checked')
            rows.append([name, s.repo_id, s.num_classes, f'{s.max_abs_diff:.1e}', s.metrics, result])
    order = [name for name, _ in models]
    rows.sort(key=lambda r: order.index(r[0]))
    print(format_table(['model', 'repo', 'classes', 'max |Δlogit|', 'metrics', 'result'], rows, align='llrrrl'))
    if failed:
        what = 'nothing uploaded' if len(uploads) == 0 else f'{failed} of {len(models)} uploads failed'
        print(f'{PROG}: error: {failed} of {len(models)} repos failed; {what}', file=sys.stderr)
        return 1
    print('dry run: nothing uploaded' if args.dry_run else f'uploaded {len(uploads)} repos, one commit each')
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description='Stage AdvProp EfficientNet weights as a timm Hub repo (timm\'s config.json + model.safetensors '
                    '+ a model card), check that timm\'s local-dir: loader gives back the same tensors, '
                    'preprocessing and logits, then upload it with create_repo + one upload_folder commit. '
                    'The token comes from huggingface_hub (HF_TOKEN, or `hf auth login`) and is never printed.')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--weights', metavar='FILE',
                     help='weights to publish (.safetensors; .pth/.bin are loaded with weights_only=True); '
                          'num_classes is taken from their classifier')
    src.add_argument('--weights-dir', metavar='DIR',
                     help='publish every DIR/<model>/model.safetensors (the layout convert/tf_to_timm.py --batch '
                          'writes), e.g. the nine converted B0-B8 files; all are staged and checked before any '
                          'is uploaded')
    p.add_argument('--model', metavar='NAME',
                   help='with --weights (required): efficientnet_bX_advprop, optionally with a tag '
                        f'(.{ZOO_TAG}, the default, or .ap_in1k) whose pretrained config config.json records')
    p.add_argument('--repo-id', metavar='ORG/NAME',
                   help='Hub repo to publish to (required with --weights); with --weights-dir a template where '
                        f'{{model}} is the model name (default: {BATCH_REPO_ID})')
    p.add_argument('--eval', metavar='JSON', action='append',
                   help='results of `advprop-zoo eval --output` for these weights; repeat it for several datasets. '
                        'The card\'s metrics tables show exactly their numbers (none without it); with --weights-dir '
                        'a template with {model}')
    p.add_argument('--dry-run', action='store_true',
                   help='stage and check only; no token needed, no network touched')
    p.add_argument('--out', metavar='DIR',
                   help='keep the staged folder here (a new or empty folder; with --weights-dir one subfolder per '
                        'model); default: a temp folder that is removed')
    p.add_argument('--private', action='store_true', help='create the repo private (only when it does not exist yet)')
    p.add_argument('--revision', metavar='BRANCH', help='commit to this branch (created from main if missing)')
    p.add_argument('--commit-message', metavar='TEXT', help='commit title (default: "Add <model> weights ...")')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.weights and not (args.model and args.repo_id):
        parser.error('--weights needs --model and --repo-id')
    if args.weights_dir:
        if args.model:
            parser.error('--model names one file\'s model; --weights-dir takes each from its folder name')
        for flag, value in [('--repo-id', args.repo_id)] + [('--eval', e) for e in args.eval or ()]:
            if value and '{model}' not in value:
                parser.error(f'with --weights-dir, {flag} is a template and must contain {{model}}')
    return run_command(PROG, lambda: _batch(args) if args.weights_dir else _single(args))


if __name__ == '__main__':
    sys.exit(main())
