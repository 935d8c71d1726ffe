"""hub/: staging timm Hub repos, reloading them (local-dir: and an offline HF cache), the model card's
numbers, and every bad input. No network: conftest sets HF_HUB_OFFLINE=1; uploads are in test_hub_upload.py."""
import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from advprop_zoo import VARIANTS, save_weights
from advprop_zoo.eval.results import SCHEMA, attack_name, metrics_of, write_results
from conftest import random_state_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # hub/ is a folder of scripts beside the package, not installed

from hub import PublishError  # noqa: E402
from hub.eval_results import read_eval_results  # noqa: E402
from hub.publish import main  # noqa: E402
from hub.stage import FILES  # noqa: E402

MODEL = 'efficientnet_b0_advprop'
REPO = 'advprop-zoo/efficientnet_b0_advprop.ap_in1k_zoo'
CONVERT_META = {
    'format': 'pt', 'source': 'efficientnet-b0.tar.gz', 'tf_scope': 'efficientnet-b0', 'ema': 'true',
    'source_sha256': json.dumps({'efficientnet-b0.tar.gz': 'ab' * 32}), 'converter': 'advprop-zoo convert/tf_to_timm.py 1.0.0',
}
# numbers of the results file that are not metrics: none of them may reach the card
NOT_METRICS = {'812.375', '50000', '48', '3.5'}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _eval_json(path: Path, source: Path, **overrides) -> Path:
    """An advprop-zoo-eval/1 results file (issue 7's schema) with unusual numbers and non-metric noise."""
    report = {
        'schema': 'advprop-zoo-eval/1', 'model': MODEL, 'num_classes': 1000,
        'weights': {'source': 'checkpoint', 'location': str(source), 'sha256': _sha(source)},
        'dataset': 'imagenet', 'data_dir': '/data/val',
        'data_config': {'input_size': [3, 224, 224], 'interpolation': 'bicubic', 'mean': [0.5] * 3, 'std': [0.5] * 3,
                        'crop_pct': 0.875, 'crop_mode': 'center'},
        'settings': {'batch_size': 48, 'attack': {'kind': 'pgd', 'eps': [1, 4], 'steps': None, 'step_size': 3.5}},
        'metrics': {'imagenet_top1': 71.234, 'imagenet_top5': 90.0625, 'imagenet_pgd2_eps1_top1': 33.3125,
                    'imagenet_pgd2_eps1_top5': 61.75, 'imagenet_pgd5_eps4_top1': 4.125,
                    'imagenet_pgd5_eps4_top5': 17.5},
        'results': {'clean': {'top1': 71.234, 'top5': 90.0625, 'images': 50000, 'images_per_s': 812.375}},
    }
    report.update(overrides)
    path.write_text(json.dumps(report))
    return path


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope='module')
def b0(tmp_path_factory):
    """Random B0 weights with convert/'s provenance metadata, and the model holding them."""
    folder = tmp_path_factory.mktemp('b0')
    model = timm.create_model(MODEL).eval()
    state_dict = random_state_dict(model)
    model.load_state_dict(state_dict)
    path = save_weights(state_dict, folder / 'b0.safetensors', metadata=CONVERT_META)
    return path, model


@pytest.fixture(scope='module')
def staged(b0, tmp_path_factory):
    """One dry run through the command line, kept in --out: the folder, its eval JSON."""
    weights, _ = b0
    tmp = tmp_path_factory.mktemp('staged')
    results = _eval_json(tmp / 'results.json', weights)
    out = tmp / 'repo'
    assert main(['--weights', str(weights), '--model', MODEL, '--repo-id', REPO, '--eval', str(results),
                 '--dry-run', '--out', str(out)]) == 0
    return out, results


def _logits(model, size=224):
    x = torch.rand((2, 3, size, size), generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        return model.eval()(x)


# --------------------------------------------------------------------------------------------------
# the staged folder: timm's layout, timm's loaders

def test_staged_folder_is_timms_layout(staged, b0):
    out, _ = staged
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == 'tf_efficientnet_b0'  # plain timm can build it
    assert cfg['num_classes'] == 1000
    pc = cfg['pretrained_cfg']
    assert pc['mean'] == [0.5] * 3 and pc['std'] == [0.5] * 3
    assert pc['input_size'] == [3, 224, 224] and pc['crop_pct'] == 0.875 and pc['interpolation'] == 'bicubic'
    assert pc['license'] == 'apache-2.0' and pc['tag'] == 'ap_in1k_zoo'
    assert 'hf_hub_id' not in pc and 'file' not in pc  # timm strips the source, as push_to_hf_hub does
    weights, _ = b0
    staged_sd, source_sd = load_file(str(out / 'model.safetensors')), load_file(str(weights))
    assert staged_sd.keys() == source_sd.keys()
    assert all(torch.equal(staged_sd[k], v) for k, v in source_sd.items())


def test_local_dir_round_trip_gives_the_source_logits(staged, b0):
    out, _ = staged
    _, source = b0
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert torch.equal(_logits(model), _logits(source))
    cfg = timm.data.resolve_model_data_config(model)
    assert tuple(cfg['mean']) == tuple(cfg['std']) == (0.5, 0.5, 0.5) and cfg['crop_pct'] == 0.875


def test_offline_hub_cache_round_trip(staged, b0, hub_cache):
    """The staged files as huggingface_hub would cache the repo: hf-hub: (plain timm, from config.json) and
    the zoo's registered tag both load them with HF_HUB_OFFLINE=1."""
    out, _ = staged
    _, source = b0
    for name in FILES:
        hub_cache(REPO, name, (out / name).read_bytes())
    want = _logits(source)
    from_hub = timm.create_model(f'hf-hub:{REPO}', pretrained=True)
    assert torch.equal(_logits(from_hub), want)
    assert tuple(timm.data.resolve_model_data_config(from_hub)['mean']) == (0.5, 0.5, 0.5)
    assert torch.equal(_logits(timm.create_model(f'{MODEL}.ap_in1k_zoo', pretrained=True)), want)


# --------------------------------------------------------------------------------------------------
# the model card

def _section(card: str, title: str) -> str:
    return card.split(f'\n## {title}\n', 1)[1].split('\n## ', 1)[0]


def _table_numbers(text: str):
    cells = [c.strip() for line in text.splitlines() if line.startswith('|') and not line.startswith('|-')
             for c in line.strip('|').split('|')]
    return [c for c in cells if re.fullmatch(r'-?\d+(\.\d+)?', c)]


def test_card_metrics_are_exactly_the_eval_json(staged):
    out, results = staged
    card = (out / 'README.md').read_text()
    metrics = json.loads(results.read_text())['metrics']
    section = _section(card, 'Evaluation')
    shown = _table_numbers(section)
    assert sorted(float(v) for v in shown) == sorted(float(v) for v in metrics.values())
    assert all(v in metrics.values() for v in map(float, shown))
    assert '| ImageNet | PGD-5 eps 4 top-1 |' in re.sub(r' +', ' ', section)
    assert '71.234' in section and '90.0625' in section  # as written, not rounded
    # numbers as words; sha256 digests are dropped first (their digit runs, e.g. '48', are not numbers and
    # vary with the temp paths inside the hashed results file)
    words = set(re.findall(r'\d+(?:\.\d+)?', re.sub(r'\b[0-9a-f]{64}\b', ' ', card)))
    assert not (words & NOT_METRICS), 'a number from the results file that is not a metric reached the card'
    for v in VARIANTS:  # no paper or timm figure is quoted as if it were measured here
        assert f'{v.paper_top1}' not in words and f'{v.timm_top1:.3f}' not in words and f'{v.timm_top1}' not in words


def test_card_contents(staged):
    out, _ = staged
    card = (out / 'README.md').read_text()
    front = card.split('---\n')[1]
    assert 'license: apache-2.0' in front and 'library_name: timm' in front and '- imagenet-1k' in front
    assert '[-1, 1]' in card and 'mean = std' in card and 'not** ImageNet' in card  # preprocessing warning
    assert 'auxiliary BatchNorm' in card and 'PGD1_eps1' in card  # how AdvProp trained B0
    assert f"timm.create_model('hf-hub:{REPO}', pretrained=True)" in card
    assert f"timm.create_model('{MODEL}.ap_in1k_zoo', pretrained=True)" in card  # the repo is a registered tag
    assert '@inproceedings{xie2020adversarial' in card and 'arxiv.org/abs/1911.09665' in card
    assert 'efficientnet-b0.tar.gz' in card and 'ab' * 32 in card  # provenance from convert/'s metadata
    assert _sha(out / 'model.safetensors') in card
    assert '## License' in card


def test_fine_tuned_head_without_eval(b0, tmp_path, capsys):
    """A 10-class fine-tune: num_classes read from the weights, no ImageNet claim, no metrics table."""
    _, model = b0
    sd = {**model.state_dict(), 'classifier.weight': torch.randn(10, 1280), 'classifier.bias': torch.randn(10)}
    weights = save_weights(sd, tmp_path / 'ft.safetensors')
    out = tmp_path / 'ft'
    rc, stdout, _ = _run(capsys, '--weights', weights, '--model', MODEL, '--repo-id', 'someone/b0-flowers',
                         '--dry-run', '--out', out)
    assert rc == 0 and 'dry run: nothing uploaded' in stdout
    assert json.loads((out / 'config.json').read_text())['num_classes'] == 10
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert loaded.num_classes == 10 and torch.equal(loaded.classifier.weight, sd['classifier.weight'])
    card = (out / 'README.md').read_text()
    assert 'No evaluation results' in card and not _table_numbers(_section(card, 'Evaluation'))
    assert 'imagenet-1k' not in card.split('---\n')[1] and '10-class classifier' in card
    assert "advprop_zoo  # registers" not in card  # not a registered repo: no tag to advertise


# --------------------------------------------------------------------------------------------------
# reading evaluation JSON

def test_defensive_reader_takes_only_the_documented_subset(tmp_path):
    path = tmp_path / 'r.json'
    path.write_text(json.dumps([
        {'dataset': 'imagenet', 'top1': 77.5, 'top5': 93.25, 'images_per_s': 99.5, 'seconds': 12,
         'robust': {'pgd': {'1': 30.5, '4': {'top1': 2.25, 'steps': 5}}}},
        {'dataset': 'imagenet-c', 'mce': 66.5, 'relative_mce': 80.25},
        {'dataset': 'imagenet-a', 'results': [{'eps': 2, 'attack': 'fgsm', 'top1': 1.5}]},
    ]))
    r = read_eval_results(path)
    got = {(m.dataset, m.name): m.value for m in r.metrics}
    assert got == {('imagenet', 'top-1'): 77.5, ('imagenet', 'top-5'): 93.25, ('imagenet', 'PGD eps 1 top-1'): 30.5,
                   ('imagenet', 'PGD-5 eps 4 top-1'): 2.25, ('imagenet-c', 'mCE'): 66.5,
                   ('imagenet-c', 'relative mCE'): 80.25, ('imagenet-a', 'FGSM eps 2 top-1'): 1.5}


@pytest.mark.parametrize('text, message', [
    ('{"top1": ', 'not valid JSON'),
    ('{"images_per_s": 812.5, "config": {"batch_size": 64}}', 'holds none of the metrics'),
    ('{"schema": "advprop-zoo-eval/1", "model": "x"}', 'without its metrics map'),
])
def test_unusable_eval_json(tmp_path, text, message):
    path = tmp_path / 'r.json'
    path.write_text(text)
    with pytest.raises(PublishError, match=message):
        read_eval_results(path)


# --------------------------------------------------------------------------------------------------
# bad inputs: one line, non-zero exit, nothing written

def _assert_clean_failure(rc, err, message, out: Path):
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('publish.py: error: ') and message in lines[0], err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if '.staging-' in p.name], 'a temp staging folder was left behind'


@pytest.mark.parametrize('repo_id', ['efficientnet_b0_advprop', 'a/b/c', 'org/bad..name', 'org/', 'org/name.git'])
def test_malformed_repo_id(b0, tmp_path, capsys, repo_id):
    weights, _ = b0
    rc, _, err = _run(capsys, '--weights', weights, '--model', MODEL, '--repo-id', repo_id, '--dry-run',
                      '--out', tmp_path / 'out')
    _assert_clean_failure(rc, err, f'repo id {repo_id!r}', tmp_path / 'out')


def test_weights_that_do_not_fit_the_model(b0, tmp_path, capsys):
    weights, _ = b0
    rc, _, err = _run(capsys, '--weights', weights, '--model', 'efficientnet_b1_advprop', '--repo-id', 'me/b1',
                      '--dry-run', '--out', tmp_path / 'out')
    _assert_clean_failure(rc, err, 'weights lack', tmp_path / 'out')  # B1 has blocks B0 lacks
    assert str(weights) in err


def test_dual_bn_weights_ask_for_fold(b0, tmp_path, capsys):
    _, model = b0
    sd = dict(model.state_dict())
    sd['bn1.aux_bn.0.weight'] = sd['bn1.weight'].clone()
    weights = save_weights(sd, tmp_path / 'dual.safetensors')
    rc, _, err = _run(capsys, '--weights', weights, '--model', MODEL, '--repo-id', 'me/b0', '--dry-run',
                      '--out', tmp_path / 'out')
    _assert_clean_failure(rc, err, 'advprop-zoo fold', tmp_path / 'out')


def test_truncated_and_missing_weights(b0, tmp_path, capsys):
    weights, _ = b0
    cut = tmp_path / 'cut.safetensors'
    cut.write_bytes(weights.read_bytes()[:-100])
    rc, _, err = _run(capsys, '--weights', cut, '--model', MODEL, '--repo-id', 'me/b0', '--dry-run',
                      '--out', tmp_path / 'out')
    _assert_clean_failure(rc, err, 'truncated', tmp_path / 'out')
    rc, _, err = _run(capsys, '--weights', tmp_path / 'nope.safetensors', '--model', MODEL, '--repo-id', 'me/b0',
                      '--dry-run', '--out', tmp_path / 'out')
    _assert_clean_failure(rc, err, 'no such weights file', tmp_path / 'out')


def test_unknown_model_suggests(b0, tmp_path, capsys):
    weights, _ = b0
    rc, _, err = _run(capsys, '--weights', weights, '--model', 'tf_efficientnet_b0', '--repo-id', 'me/b0',
                      '--dry-run', '--out', tmp_path / 'out')
    _assert_clean_failure(rc, err, "did you mean 'efficientnet_b0_advprop'", tmp_path / 'out')


def test_existing_non_empty_output_dir_is_left_alone(b0, tmp_path, capsys):
    weights, _ = b0
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    rc, _, err = _run(capsys, '--weights', weights, '--model', MODEL, '--repo-id', 'me/b0', '--dry-run', '--out', out)
    assert rc == 1 and 'already exists and is not an empty folder' in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ['notes.txt'] and (out / 'notes.txt').read_text() == 'mine'


def test_eval_json_of_other_weights(b0, tmp_path, capsys):
    weights, _ = b0
    other = _eval_json(tmp_path / 'b3.json', weights, model='efficientnet_b3_advprop')
    rc, _, err = _run(capsys, '--weights', weights, '--model', MODEL, '--repo-id', 'me/b0', '--eval', other,
                      '--dry-run', '--out', tmp_path / 'out')
    _assert_clean_failure(rc, err, 'evaluates efficientnet_b3_advprop', tmp_path / 'out')
    moved = _eval_json(tmp_path / 'sha.json', weights, weights={'sha256': 'f' * 64})
    rc, _, err = _run(capsys, '--weights', weights, '--model', MODEL, '--repo-id', 'me/b0', '--eval', moved,
                      '--dry-run', '--out', tmp_path / 'out')
    _assert_clean_failure(rc, err, 'measured weights with sha256 ffffffffffff', tmp_path / 'out')


def test_eval_of_the_published_file_is_accepted(staged, b0, tmp_path, capsys):
    """An eval of the repo itself hashes the staged model.safetensors (timm re-serialised the tensors):
    that hash is as good as the source file's."""
    out, _ = staged
    weights, _ = b0
    results = _eval_json(tmp_path / 'hub.json', out / 'model.safetensors')
    rc, _, err = _run(capsys, '--weights', weights, '--model', MODEL, '--repo-id', REPO, '--eval', results,
                      '--dry-run', '--out', tmp_path / 'again')
    assert rc == 0, err
    assert "(this repo's `model.safetensors`)" in (tmp_path / 'again' / 'README.md').read_text()


def test_failure_mid_staging_leaves_nothing(b0, tmp_path, capsys, monkeypatch):
    """A check that fails after timm wrote the files: the temp folder goes, the target never appears."""
    import hub.stage

    def broken(*args, **kwargs):
        raise PublishError('simulated check failure')
    monkeypatch.setattr(hub.stage, 'validate_folder', broken)
    weights, _ = b0
    rc, _, err = _run(capsys, '--weights', weights, '--model', MODEL, '--repo-id', 'me/b0', '--dry-run',
                      '--out', tmp_path / 'out')
    _assert_clean_failure(rc, err, 'simulated check failure', tmp_path / 'out')


def test_argument_combinations(capsys):
    for argv in (['--weights', 'w.safetensors', '--repo-id', 'me/x'],  # no --model
                 ['--weights-dir', 'zoo', '--model', MODEL],
                 ['--weights-dir', 'zoo', '--repo-id', 'me/one-repo-for-all']):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert 'must contain {model}' in capsys.readouterr().err


def test_reads_what_advprop_zoo_eval_writes(tmp_path):
    """The card's reader against the eval command's own writer (issue 7)."""
    report = {
        'schema': SCHEMA, 'model': MODEL, 'num_classes': 1000, 'weights': {'sha256': None}, 'dataset': 'imagenet-c',
        'results': {
            'clean': {'top1': 70.5, 'top5': 90.25, 'images': 10, 'images_per_s': 5.5},
            'robust': [{'name': attack_name('pgd', 4, 5, False), 'kind': 'pgd', 'eps': 4, 'steps': 5,
                        'step_size': 1, 'targeted': False, 'top1': 3.5, 'top5': 9.75, 'images': 10,
                        'images_per_s': 1.5}],
            'imagenet_c': {'mce': 66.125, 'relative_mce': 80.5, 'corruptions': {'fog': {'error': 40.25, 'ce': 65.5}}},
        },
    }
    report['metrics'] = metrics_of(report)
    write_results(report, tmp_path / 'r.json')
    got = {(m.dataset, m.name): m.value for m in read_eval_results(tmp_path / 'r.json').metrics}
    assert got == {('ImageNet', 'top-1'): 70.5, ('ImageNet', 'top-5'): 90.25, ('ImageNet', 'PGD-5 eps 4 top-1'): 3.5,
                   ('ImageNet', 'PGD-5 eps 4 top-5'): 9.75, ('ImageNet-C', 'mCE'): 66.125,
                   ('ImageNet-C', 'relative mCE'): 80.5, ('ImageNet-C', 'fog mean error'): 40.25,
                   ('ImageNet-C', 'fog CE'): 65.5}
