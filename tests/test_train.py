"""advprop-zoo train end to end on small folders the tests make, and its bad inputs."""
import json
import logging

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from advprop_zoo.cli import main as cli_main
from advprop_zoo_train import TrainingError, build_parser, train
from advprop_zoo_train.data import DataError, check_image_folder, digits_folder

TINY = ['--model', 'test_efficientnet', '--input-size', '3', '32', '32', '--epochs', '1', '--batch-size', '8',
        '--opt', 'adamw', '--lr', '1e-3', '--sched', 'cosine', '--warmup-epochs', '0', '--workers', '0',
        '--hflip', '0', '--scale', '0.8', '1.0', '--no-progress']


def _make_folder(root, classes=3, train=8, val=4, size=32):
    g = torch.Generator().manual_seed(0)
    for split, n in (('train', train), ('val', val)):
        for c in range(classes):
            d = root / split / f'class{c}'
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = torch.full((size, size, 3), 60.0 * c)
                img = (base + 40 * torch.rand(size, size, 3, generator=g)).clamp(0, 255).byte().numpy()
                Image.fromarray(img).save(d / f'{i}.png')
    return root


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return _make_folder(tmp_path_factory.mktemp('data'))


def _args(folder, out, *extra):
    return build_parser().parse_args([*TINY, '--data-dir', str(folder), '--output', str(out), *extra])


@pytest.mark.parametrize('mode', ['advprop', 'fast-advprop', 'adv-train', 'vanilla'])
def test_train_writes_folded_weights_log_and_plot(folder, tmp_path, mode):
    result = train(_args(folder, tmp_path / mode, '--mode', mode, '--attack-eps', '2'))
    out = tmp_path / mode
    weights = load_file(str(out / 'model.safetensors'))
    assert not any('aux_bn' in k for k in weights)
    plain = timm.create_model('test_efficientnet', num_classes=3)
    plain.load_state_dict(weights, strict=True)  # the folded result is the plain timm model
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['mode'] == mode and len(summary['epochs_log']) == 1
    assert (out / 'log.csv').read_text().splitlines()[0].startswith('epoch,step,lr,train_loss')
    assert (out / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert result.summary['attack'] == 'PGD3_eps2'


def test_ema_and_bf16(folder, tmp_path):
    train(_args(folder, tmp_path, '--mode', 'advprop', '--model-ema', '--model-ema-decay', '0.9', '--amp', '--amp-dtype', 'bfloat16',
                '--channels-last'))
    ema = load_file(str(tmp_path / 'model_ema.safetensors'))
    timm.create_model('test_efficientnet', num_classes=3).load_state_dict(ema, strict=True)


def test_zoo_model_gets_paper_attacker(folder, tmp_path):
    args = _args(folder, tmp_path, '--model', 'efficientnet_b3_advprop')
    from advprop_zoo_train.loop import _attack_config
    assert str(_attack_config(args, args.model)) == 'PGD4_eps3'


def test_cli_dispatches_train(folder, tmp_path, capsys):
    assert cli_main(['train', *TINY, '--data-dir', str(folder), '--output', str(tmp_path), '--mode', 'vanilla']) == 0
    assert 'val top-1' in capsys.readouterr().out


def test_nan_loss_stops_with_step(folder, tmp_path, monkeypatch):
    import advprop_zoo.modes as modes
    real = modes.forward_loss
    calls = []

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            out.loss = out.loss * float('nan')
        return out
    monkeypatch.setattr(modes, 'forward_loss', poisoned)
    with pytest.raises(TrainingError, match='non-finite loss .* step 2'):
        train(_args(folder, tmp_path, '--mode', 'advprop'))


def test_bad_inputs(folder, tmp_path, capsys):
    with pytest.raises(DataError, match='does not exist'):
        train(_args(tmp_path / 'missing', tmp_path / 'o1'))
    empty = tmp_path / 'empty'
    (empty / 'train' / 'a').mkdir(parents=True)
    (empty / 'val' / 'a').mkdir(parents=True)
    with pytest.raises(DataError, match='class folder holds no images'):
        train(_args(empty, tmp_path / 'o2'))
    assert not (tmp_path / 'o2').exists()  # failed before writing anything
    (tmp_path / 'bare').mkdir()
    with pytest.raises(DataError, match='no class folders'):
        check_image_folder(tmp_path / 'bare')
    with pytest.raises(ValueError, match='eps'):
        train(_args(folder, tmp_path / 'o3', '--attack-eps', '-1'))
    with pytest.raises(SystemExit):
        build_parser().parse_args(['--mode', 'trades'])
    assert cli_main(['train', *TINY, '--data-dir', str(tmp_path / 'missing')]) == 1
    assert 'does not exist' in capsys.readouterr().err


def test_corrupt_image_is_reported_by_name(tmp_path, caplog):
    root = _make_folder(tmp_path / 'data', classes=2, train=8, val=2)
    (root / 'train' / 'class0' / 'broken.png').write_bytes(b'not a png at all')
    with caplog.at_level(logging.WARNING):
        train(_args(root, tmp_path / 'out', '--mode', 'vanilla'))
    assert 'broken.png' in caplog.text


def test_digits_folder_is_a_fixed_real_split(tmp_path):
    root = digits_folder(tmp_path)
    assert check_image_folder(root / 'train') == [str(i) for i in range(10)]
    n_train = sum(1 for _ in (root / 'train').rglob('*.png'))
    n_val = sum(1 for _ in (root / 'val').rglob('*.png'))
    assert (n_train, n_val) == (1437, 360)
    assert digits_folder(tmp_path) == root  # cached
    with Image.open(next((root / 'val' / '3').iterdir())) as img:
        assert img.size == (32, 32) and img.mode == 'RGB'


def test_fp16_gradscaler_and_compile_on_cpu(folder, tmp_path):
    """The speed flags' code paths that run here: fp16 autocast with a GradScaler (attack included) and
    torch.compile (dynamo capture + AOT autograd of the train step and the attack, every BN route) on a tiny
    model. The aot_eager backend skips inductor's C++ code generation, which takes minutes on 2 cores."""
    result = train(_args(folder, tmp_path, '--mode', 'advprop', '--amp', '--amp-dtype', 'float16', '--torchcompile',
                         'aot_eager', '--max-steps', '2', '--attack-eps', '2'))
    assert result.summary['steps'] == 2
    from advprop_zoo_train.checkpoint import latest_checkpoint
    import torch as _torch
    state = _torch.load(latest_checkpoint(tmp_path / 'checkpoints') / 'state.pt', weights_only=True)
    assert state['scaler']['scale'] > 0  # the GradScaler's state is checkpointed with the rest
