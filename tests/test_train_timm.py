"""advprop-zoo train speaks timm: config files and args.yaml, recipes, timm's lr rule and optimizer kwargs,
gradient accumulation, mixup, run folders, initial weights, summary.csv and plain progress lines."""
import csv
import json

import pytest
import timm
import torch
import yaml

from advprop_zoo import save_weights
from advprop_zoo_train import train
from advprop_zoo_train.args import args_yaml, build_parser, parse_args
from advprop_zoo_train.loop import resolve_lr
from advprop_zoo_train.main import main
from test_train import TINY, _make_folder


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return _make_folder(tmp_path_factory.mktemp('data'))


def _argv(folder, out, *extra):
    return [*TINY, '--data-dir', str(folder), '--output', str(out), *extra]


def _fails(capsys, argv, *expected):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'Traceback' not in err[0], err
    for text in expected:
        assert text in err[0], err[0]


def test_config_file_sets_defaults_and_flags_win(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('lr: 0.5\nepochs: 7\nmodel_ema: true\nscale: [0.5, 1.0]\nopt-betas: [0.8, 0.9]\n')
    args = parse_args(['-c', str(cfg), '--epochs', '3'])
    assert (args.lr, args.epochs, args.model_ema, args.scale, args.opt_betas) == (0.5, 3, True, [0.5, 1.0],
                                                                                  [0.8, 0.9])


@pytest.mark.parametrize('text, expected', [
    ('lr: 0.5\nnot_a_flag: 1\n', "unknown key 'not_a_flag'"), ('epochs: many\n', "epochs: 'many' is not a int"),
    ('model_ema: 3\n', 'is not true/false'), ('opt: [1, 2]\n', 'is not a'), ('- a\n- b\n', 'not a list'),
    ('sched: [unclosed\n', 'not valid YAML'), ('amp_dtype: float8\n', 'is not one of'),
])
def test_bad_config_is_one_line(capsys, tmp_path, text, expected):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text(text)
    _fails(capsys, ['-c', str(cfg), '--data-dir', str(tmp_path)], str(cfg), expected)


def test_args_yaml_repeats_the_run(folder, tmp_path):
    args = parse_args(_argv(folder, tmp_path / 'run', '--mode', 'vanilla', '--seed', '3', '--max-steps', '1'))
    train(args)
    saved = tmp_path / 'run' / 'args.yaml'
    assert yaml.safe_load(saved.read_text())['seed'] == 3
    again = parse_args(['-c', str(saved)])
    assert {k: v for k, v in vars(again).items() if k != 'config'} == \
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != 'config'}
    assert args_yaml(again) == args_yaml(args).replace('config: null', f'config: {saved}')


def test_paper_recipe_is_the_published_one_and_flags_override_it(capsys):
    args = parse_args(['--recipe', 'paper', '--model', 'efficientnet_b3_advprop', '--epochs', '10'])
    assert (args.opt, args.opt_eps, args.lr_base, args.decay_epochs, args.decay_rate, args.warmup_epochs) == \
        ('rmsproptf', 1e-3, 0.016, 2.4, 0.97, 5)
    assert (args.weight_decay, args.smoothing, args.model_ema, args.model_ema_decay, args.aa) == \
        (1e-5, 0.1, True, 0.9999, 'v0')
    assert (args.drop, args.drop_path, args.epochs) == (0.3, 0.2, 10)  # B3's dropout; --epochs given wins
    from advprop_zoo_train.recipes import describe
    assert describe(args) == 'recipe paper for efficientnet_b3_advprop; overridden: --epochs 10 (preset 350)'
    b7 = parse_args(['--recipe', 'paper', '--model', 'efficientnet_b7_advprop'])
    assert b7.drop == 0.5 and b7.epochs == 350


def test_finetune_recipe_needs_weights(capsys, folder, tmp_path):
    _fails(capsys, _argv(folder, tmp_path / 'r', '--recipe', 'finetune'), '--recipe finetune', '--pretrained')


def test_lr_follows_timms_rule():
    def lr(*argv):
        return resolve_lr(build_parser().parse_args(list(argv)), world_size=2)
    assert lr('--opt', 'sgd', '--lr-base', '0.1', '-b', '64') == pytest.approx(0.1 * 128 / 256)
    assert lr('--opt', 'adamw', '--lr-base', '0.1', '-b', '64') == pytest.approx(0.1 * (128 / 256) ** 0.5)
    assert lr('--opt', 'adamw', '--lr-base-scale', 'linear', '--lr-base', '0.1', '-b', '64') == pytest.approx(0.05)
    assert lr('--opt', 'sgd', '--lr-base', '0.1', '-b', '64', '--grad-accum-steps', '4') == pytest.approx(0.2)
    assert lr('--lr', '0.3', '-b', '64') == 0.3


def test_opt_eps_and_betas_reach_any_optimizer(folder, tmp_path):
    train(parse_args(_argv(folder, tmp_path / 'r', '--mode', 'vanilla', '--opt-eps', '1e-6', '--opt-betas', '0.8',
                           '0.95', '--max-steps', '1')))
    from advprop_zoo_train.checkpoint import latest_checkpoint
    state = torch.load(latest_checkpoint(tmp_path / 'r' / 'checkpoints') / 'state.pt', weights_only=True)
    group = state['optimizer']['param_groups'][0]
    assert group['eps'] == 1e-6 and tuple(group['betas']) == (0.8, 0.95)


def test_gradient_accumulation_steps_once_per_n_batches(folder, tmp_path):
    result = train(parse_args(_argv(folder, tmp_path / 'r', '--mode', 'advprop', '--attack-eps', '1',
                                    '--grad-accum-steps', '2', '-b', '4')))
    assert result.summary['steps'] == 3  # 24 images, batch 4: 6 batches, an update every 2


def test_mixup_and_cutmix_train_with_advprop(folder, tmp_path):
    result = train(parse_args(_argv(folder, tmp_path / 'r', '--mode', 'advprop', '--attack-eps', '2', '--mixup',
                                    '0.2', '--cutmix', '1.0', '--mixup-off-epoch', '2', '--epochs', '2')))
    assert result.summary['finished'] and result.summary['epochs'] == 2


def test_second_run_into_a_run_folder_is_refused(capsys, folder, tmp_path):
    assert main(_argv(folder, tmp_path / 'r', '--max-steps', '1', '--mode', 'vanilla')) == 0
    capsys.readouterr()
    before = sorted(p.name for p in (tmp_path / 'r').iterdir())
    _fails(capsys, _argv(folder, tmp_path / 'r', '--mode', 'vanilla'), 'already holds a run', '--resume')
    assert sorted(p.name for p in (tmp_path / 'r').iterdir()) == before


def test_experiment_names_the_run_folder_under_output(folder, tmp_path):
    result = train(parse_args(_argv(folder, tmp_path, '--experiment', 'exp1', '--mode', 'vanilla')))
    assert result.summary['output'] == str(tmp_path / 'exp1') and (tmp_path / 'exp1' / 'args.yaml').is_file()


def test_summary_csv_as_timm_writes_it_and_model_best(folder, tmp_path):
    train(parse_args(_argv(folder, tmp_path / 'r', '--mode', 'advprop', '--attack-eps', '1', '--epochs', '2')))
    rows = list(csv.DictReader((tmp_path / 'r' / 'summary.csv').open()))
    assert [r['epoch'] for r in rows] == ['1', '2']
    assert list(rows[0]) == ['epoch', 'train_train_loss', 'train_clean_loss', 'train_adv_loss', 'eval_top1',
                             'eval_top5', 'lr']
    assert (tmp_path / 'r' / 'log.csv').read_text().splitlines()[0] == \
        'epoch,step,lr,train_loss,clean_loss,adv_loss,val_top1,images_per_s'  # unchanged format
    best = json.loads((tmp_path / 'r' / 'summary.json').read_text())['best']
    assert best['metric'] == 'top1' and best['value'] == max(float(r['eval_top1']) for r in rows)
    timm.create_model('test_efficientnet', num_classes=3).load_state_dict(
        __import__('safetensors.torch').torch.load_file(str(tmp_path / 'r' / 'model_best.safetensors')))


def test_progress_is_plain_lines_when_not_a_terminal(capsys, folder, tmp_path):
    argv = [a for a in _argv(folder, tmp_path / 'r', '--mode', 'vanilla', '--log-interval', '1') if a != '--no-progress']
    train(parse_args(argv))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith('vanilla epoch 1/1 [')]
    assert [line.split(']')[0] for line in lines] == [f'vanilla epoch 1/1 [{i}/3' for i in (1, 2, 3)]
    assert '\r' not in out and all('img/s' in line for line in lines)


def test_initial_checkpoint_and_pretrained_path(folder, tmp_path):
    model = timm.create_model('test_efficientnet', num_classes=3)
    with torch.no_grad():
        model.classifier.weight.fill_(0.25)
    path = save_weights(model.state_dict(), tmp_path / 'init.safetensors')
    args = parse_args(_argv(folder, tmp_path / 'a', '--mode', 'vanilla', '--initial-checkpoint', str(path),
                            '--max-steps', '1', '--lr', '0'))
    result = train(args)
    assert torch.allclose(result.model.classifier.weight, torch.full_like(result.model.classifier.weight, 0.25))
    ten = timm.create_model('test_efficientnet', num_classes=10)
    path10 = save_weights(ten.state_dict(), tmp_path / 'ten.safetensors')
    args = parse_args(_argv(folder, tmp_path / 'b', '--mode', 'vanilla', '--pretrained-path', str(path10),
                            '--max-steps', '1'))
    assert train(args).model.num_classes == 3  # a new 3-class head on the 10-class file's body


def test_initial_checkpoint_of_another_head_is_one_line(capsys, folder, tmp_path):
    ten = timm.create_model('test_efficientnet', num_classes=10)
    path10 = save_weights(ten.state_dict(), tmp_path / 'ten.safetensors')
    _fails(capsys, _argv(folder, tmp_path / 'r', '--initial-checkpoint', str(path10)), 'shape mismatch',
           'classifier')
    assert not (tmp_path / 'r').exists()


def test_log_wandb_without_wandb_is_one_line(capsys, folder, tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == 'wandb':
            raise ImportError('no wandb')
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, '__import__', no_wandb)
    _fails(capsys, _argv(folder, tmp_path / 'r', '--log-wandb', '--mode', 'vanilla'), 'pip install wandb')


def test_log_wandb_logs_every_epoch(folder, tmp_path, monkeypatch):
    import sys
    import types
    logged, inits = [], []
    fake = types.SimpleNamespace(init=lambda **k: inits.append(k), log=lambda row: logged.append(dict(row)))
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    train(parse_args(_argv(folder, tmp_path / 'r', '--log-wandb', '--mode', 'vanilla', '--epochs', '2')))
    assert inits[0]['project'] == 'advprop-zoo' and inits[0]['config']['mode'] == 'vanilla'
    assert [r['epoch'] for r in logged] == [1, 2] and 'eval_top1' in logged[0]

