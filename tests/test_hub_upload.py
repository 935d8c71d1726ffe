"""hub/ uploads against a fake HfApi (no network, ever): what create_repo / upload_folder receive, the
token's path (in from huggingface_hub, out only to HfApi, never printed or written), batch mode."""
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm

from advprop_zoo import save_weights
from conftest import random_state_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # hub/ is a folder of scripts beside the package, not installed

import hub.upload  # noqa: E402
from hub.publish import main  # noqa: E402
from hub.stage import FILES  # noqa: E402

MODEL = 'efficientnet_b0_advprop'
REPO = 'advprop-zoo/efficientnet_b0_advprop.ap_in1k_zoo'
TOKEN = 'hf_SeNtInElToKeN0123456789abcdefghij'


class FakeHub:
    """Stands in for huggingface_hub.HfApi and records every call; upload_folder also records what the
    folder held at that moment (a temp staging folder is gone afterwards)."""

    def __init__(self):
        self.calls = []
        self.fail_upload = None

    def __call__(self, token=None, **kwargs):  # HfApi(token=..., library_name=..., library_version=...)
        self.calls.append(('HfApi', {'token': token, **kwargs}))
        return self

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(('create_repo', {'repo_id': repo_id, **kwargs}))
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(('create_branch', {'repo_id': repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs['folder_path'])
        kwargs['files'] = sorted(p.name for p in folder.iterdir())
        kwargs['card'] = (folder / 'README.md').read_text()
        self.calls.append(('upload_folder', kwargs))
        if self.fail_upload:
            raise self.fail_upload
        return SimpleNamespace(commit_url=f'https://huggingface.co/{kwargs["repo_id"]}/commit/0123abc')

    def named(self, name):
        return [kw for n, kw in self.calls if n == name]


@pytest.fixture
def fake_hub(monkeypatch):
    """Online (as far as huggingface_hub can tell), a token in HF_TOKEN, and a fake HfApi."""
    from huggingface_hub import constants
    fake = FakeHub()
    monkeypatch.setattr(hub.upload, 'HfApi', fake)
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    monkeypatch.delenv('HUGGING_FACE_HUB_TOKEN', raising=False)
    monkeypatch.delenv('HF_OIDC_RESOURCE', raising=False)
    return fake


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    model = timm.create_model(MODEL)
    return save_weights(random_state_dict(model), tmp_path_factory.mktemp('w') / 'b0.safetensors')


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _no_token_in(*texts, folder: Path = None):
    for text in texts:
        assert TOKEN not in text
    if folder is not None:
        for path in folder.rglob('*'):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), path


def test_upload_gets_repo_folder_message_and_token(fake_hub, weights, tmp_path, capsys):
    out = tmp_path / 'repo'
    rc, stdout, err = _run(capsys, '--weights', weights, '--model', MODEL, '--repo-id', REPO, '--out', out,
                           '--private', '--revision', 'v1', '--commit-message', 'Add B0 AdvProp weights')
    assert rc == 0, err
    assert [n for n, _ in fake_hub.calls] == ['HfApi', 'create_repo', 'create_branch', 'upload_folder']
    assert fake_hub.named('HfApi')[0]['token'] == TOKEN  # from huggingface_hub's own lookup (HF_TOKEN here)
    assert fake_hub.named('create_repo') == [{'repo_id': REPO, 'private': True, 'repo_type': 'model', 'exist_ok': True}]
    assert fake_hub.named('create_branch')[0]['branch'] == 'v1'
    (up,) = fake_hub.named('upload_folder')  # one commit
    assert up['repo_id'] == REPO and Path(up['folder_path']) == out and up['revision'] == 'v1'
    assert up['commit_message'] == 'Add B0 AdvProp weights' and up['repo_type'] == 'model'
    assert up['files'] == sorted(FILES)
    assert 'https://huggingface.co/advprop-zoo/efficientnet_b0_advprop.ap_in1k_zoo/commit/0123abc' in stdout
    _no_token_in(stdout, err, up['card'], up['commit_description'], folder=out)


def test_upload_from_a_temp_folder_with_default_message(fake_hub, weights, tmp_path, capsys):
    rc, stdout, err = _run(capsys, '--weights', weights, '--model', MODEL, '--repo-id', 'someone/b0-advprop')
    assert rc == 0, err
    (up,) = fake_hub.named('upload_folder')
    assert up['files'] == sorted(FILES) and up['revision'] is None and not fake_hub.named('create_branch')
    assert MODEL in up['commit_message'] and weights.name not in up['commit_description']
    assert not Path(up['folder_path']).exists()  # the temp staging folder is removed
    assert fake_hub.named('create_repo')[0]['private'] is False
    _no_token_in(stdout, err)


def test_upload_failure_is_one_line_and_hides_the_token(fake_hub, weights, tmp_path, capsys):
    fake_hub.fail_upload = RuntimeError(f'401 Client Error: Unauthorized (Authorization: Bearer {TOKEN})\nmore')
    rc, stdout, err = _run(capsys, '--weights', weights, '--model', MODEL, '--repo-id', REPO)
    assert rc == 1
    assert len(err.strip().splitlines()) == 1 and f'upload to {REPO} failed' in err and '***' in err
    _no_token_in(stdout, err)


def test_missing_token_stops_before_any_work(fake_hub, weights, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv('HF_TOKEN')  # HF_HOME is conftest's empty temp folder: no token file either
    out = tmp_path / 'repo'
    rc, _, err = _run(capsys, '--weights', weights, '--model', MODEL, '--repo-id', REPO, '--out', out)
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert 'no Hugging Face token' in err and 'HF_TOKEN' in err and '--dry-run' in err
    assert not out.exists() and not fake_hub.calls


def test_offline_refuses_a_real_upload(fake_hub, weights, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    rc, _, err = _run(capsys, '--weights', weights, '--model', MODEL, '--repo-id', REPO)
    assert rc == 1 and 'HF_HUB_OFFLINE is set' in err and not fake_hub.calls


def _eval(path: Path, top1: float) -> None:
    path.write_text(json.dumps({'schema': 'advprop-zoo-eval/1', 'model': MODEL, 'dataset': 'imagenet',
                                'metrics': {'imagenet_top1': top1}}))


def test_batch_stages_all_then_uploads_each(fake_hub, weights, tmp_path, capsys):
    """convert's batch layout: <model>/model.safetensors; other entries are skipped, not guessed at."""
    zoo = tmp_path / 'zoo'
    (zoo / MODEL).mkdir(parents=True)
    shutil.copy(weights, zoo / MODEL / 'model.safetensors')
    (zoo / 'tf_efficientnet_b0').mkdir()
    (zoo / 'notes.txt').write_text('x')
    _eval(tmp_path / f'{MODEL}.json', 12.375)
    out = tmp_path / 'staged'
    rc, stdout, err = _run(capsys, '--weights-dir', zoo, '--eval', str(tmp_path / '{model}.json'), '--out', out)
    assert rc == 0, err
    assert 'skipped' in stdout and 'notes.txt' in stdout and 'tf_efficientnet_b0' in stdout
    (up,) = fake_hub.named('upload_folder')
    assert up['repo_id'] == REPO and Path(up['folder_path']) == out / MODEL and up['files'] == sorted(FILES)
    assert '12.375' in up['card']
    assert sorted(p.name for p in (out / MODEL).iterdir()) == sorted(FILES)
    assert 'uploaded 1 repos' in stdout
    _no_token_in(stdout, err, folder=out)


def test_batch_uploads_nothing_if_any_repo_fails(fake_hub, weights, tmp_path, capsys):
    zoo = tmp_path / 'zoo'
    for name in (MODEL, 'efficientnet_b1_advprop'):  # B0's weights in B1's folder do not fit B1
        (zoo / name).mkdir(parents=True)
        shutil.copy(weights, zoo / name / 'model.safetensors')
    rc, stdout, err = _run(capsys, '--weights-dir', zoo, '--repo-id', 'me/{model}')
    assert rc == 1
    assert 'FAILED' in stdout and 'efficientnet_b1_advprop' in stdout and 'nothing uploaded' in err
    assert not fake_hub.named('upload_folder') and not fake_hub.named('create_repo')
