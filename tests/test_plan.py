"""advprop-zoo plan: step counts against a hand count, totals arithmetic, the GPU check's JSON, --all,
and the rule that no throughput is ever invented."""
import json

import pytest

from advprop_zoo.cli import main
from advprop_zoo.efficientnet_advprop import VARIANTS
from advprop_zoo.modes import MODES
from advprop_zoo.plan import (
    IMAGENET_TRAIN_IMAGES, NO_THROUGHPUT, RECIPE_EPOCHS, MeasuredFileError, plan_rows, read_measured, resolve_epochs,
    step_cost,
)

B0, B3, B7 = 'efficientnet_b0_advprop', 'efficientnet_b3_advprop', 'efficientnet_b7_advprop'


def write_json(tmp_path, data, name='gpu.json'):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def gpu_json(tmp_path, model=B0, **extra):
    rows = [
        {'name': 'vanilla', 'images_per_s': 2000.0, 'ratio_to_vanilla': 1.0, 'ms_per_step': 32.0},
        {'name': 'advprop-pgd1', 'images_per_s': 800.0, 'ratio_to_vanilla': 2.5},
        {'name': 'advprop-pgd5', 'images_per_s': 350.0, 'ratio_to_vanilla': 5.714},
        {'name': 'fast-advprop', 'images_per_s': 1600.0, 'ratio_to_vanilla': 1.25},
    ]
    data = {'device': 'NVIDIA H200', 'rows': rows, **extra}
    if model:
        data['model'] = model
    return write_json(tmp_path, data)


# --- counts: each checked against the passes of modes.forward_loss, counted by hand ---

@pytest.mark.parametrize('mode, k, expected', [
    ('vanilla', 1, (0, 1.0)),          # one clean fwd+bwd
    ('advprop', 1, (1, 3.0)),          # clean 1 + PGD-1 attack 1 + adversarial 1
    ('advprop', 4, (4, 6.0)),          # clean 1 + 4 + adversarial 1
    ('advprop', 5, (5, 7.0)),          # clean 1 + 5 + adversarial 1
    ('adv-train', 1, (1, 3.0)),        # attack 1 + one pass over [clean; adv] (2 units)
    ('adv-train', 5, (5, 7.0)),
])
def test_step_cost_matches_a_hand_count(mode, k, expected):
    assert step_cost(mode, k) == expected


def test_madry_adv_train_skips_the_clean_half():
    assert step_cost('adv-train', 3, clean_weight=0.0) == (3, 4.0)  # attack 3 + adversarial-only pass 1


def test_fast_advprop_reuses_the_clean_pass():
    # batch 64, p_adv 0.2: forward_loss attacks round(12.8) = 13 images -> 1 + 13/64, no attack pass
    assert step_cost('fast-advprop', batch_size=64, p_adv=0.2) == (0, 1 + 13 / 64)
    assert step_cost('fast-advprop', batch_size=100, p_adv=0.5) == (0, 1.5)
    assert step_cost('fast-advprop', batch_size=4, p_adv=0.01) == (0, 1.25)  # at least one image


def test_every_mode_has_a_count():
    for mode in MODES:
        passes, cost = step_cost(mode, 2)
        assert cost >= 1.0 and passes in (0, 2)


# --- totals ---

def test_totals_follow_the_train_loop_drop_last():
    (row,) = plan_rows([B0], mode='vanilla', gpus=64, epochs=350, batch_size=64)
    assert row['global_batch'] == 4096
    assert row['steps_per_epoch'] == IMAGENET_TRAIN_IMAGES // 4096 == 312  # the partial batch is dropped
    assert row['images_per_epoch'] == 312 * 4096 == 1_277_952
    assert row['steps'] == 312 * 350 == 109_200
    assert row['images'] == 109_200 * 4096 == 447_283_200
    assert row['cost'] == 1.0 and row['attack_passes'] == 0


def test_gpu_hours_arithmetic():
    (row,) = plan_rows([B0], mode='advprop', gpus=8, epochs=10, batch_size=50, images=10_000,
                       vanilla_images_per_s=400.0, throughput_model=B0)
    assert (row['steps_per_epoch'], row['steps'], row['images']) == (25, 250, 100_000)
    assert row['gpu_hours'] == pytest.approx(100_000 * 3.0 / 400.0 / 3600)  # PGD-1: 3 vanilla steps each
    assert row['throughput_source'] == '--vanilla-images-per-s'


def test_epochs_from_the_flag_or_the_recipe():
    assert resolve_epochs(None, 'paper') == 350
    assert resolve_epochs(90, 'paper') == 90
    with pytest.raises(ValueError, match='--epochs'):
        resolve_epochs(None, None)
    with pytest.raises(ValueError, match='unknown recipe'):
        resolve_epochs(None, 'imagenet-fast')


def test_recipe_epochs_agree_with_the_train_presets():
    from advprop_zoo_train.recipes import recipe_values
    for name, epochs in RECIPE_EPOCHS.items():
        assert recipe_values(name, B0)['epochs'] == epochs


# --- --all ---

def test_all_rows_use_each_sizes_paper_attacker_and_resolution():
    rows = plan_rows([v.name for v in VARIANTS], mode='advprop', gpus=64, epochs=350)
    assert [r['model'] for r in rows] == [f'efficientnet_b{i}_advprop' for i in range(9)]
    assert [r['input'] for r in rows] == [224, 240, 260, 300, 380, 456, 528, 600, 672]
    assert [r['attack_passes'] for r in rows] == [1, 1, 1, 4, 5, 5, 5, 5, 5]
    assert [r['cost'] for r in rows] == [3.0, 3.0, 3.0, 6.0, 7.0, 7.0, 7.0, 7.0, 7.0]
    assert rows[3]['attack'] == 'PGD4_eps3' and rows[8]['attack'] == 'PGD5_eps4'


def test_cli_all_prints_nine_rows(capsys):
    assert main(['plan', '--all', '--recipe', 'paper', '--gpus', '64']) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith('| efficientnet_b')]
    assert len(rows) == 9
    assert '| PGD1_eps1 |' in rows[0] and '3.00x' in rows[0] and '4,096' in rows[0] and '447,283,200' in rows[0]
    assert '| PGD5_eps4 |' in rows[8] and '7.00x' in rows[8] and ' 672 |' in rows[8]


def test_attack_flags_override_the_paper_attacker():
    (row,) = plan_rows([B0], mode='advprop', attack_eps=4)
    assert (row['attack'], row['cost']) == ('PGD5_eps4', 7.0)
    (row,) = plan_rows([B7], mode='adv-train', attack_steps=2)
    assert (row['attack_passes'], row['cost']) == (2, 4.0)


# --- no invented throughput ---

def test_no_throughput_no_gpu_hours(capsys):
    (row,) = plan_rows([B0], mode='advprop')
    assert row['gpu_hours'] is None and row['throughput_source'] == NO_THROUGHPUT
    assert main(['plan', '--model', B0, '--recipe', 'paper']) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(f'| {B0}'))
    assert line.rstrip(' |').endswith('give --vanilla-images-per-s')


def test_a_throughput_is_never_carried_to_another_size():
    rows = plan_rows([v.name for v in VARIANTS], vanilla_images_per_s=1500.0, throughput_model=B3)
    assert [r['gpu_hours'] is not None for r in rows] == [i == 3 for i in range(9)]


def test_a_throughput_needs_its_model(capsys):
    with pytest.raises(ValueError, match='--model'):
        plan_rows([B0], vanilla_images_per_s=100.0)
    assert main(['plan', '--all', '--recipe', 'paper', '--vanilla-images-per-s', '100']) == 1
    assert capsys.readouterr().err.count('\n') == 1


def test_json_throughput_only_for_its_model(tmp_path):
    measured = read_measured(gpu_json(tmp_path, model=B0))
    b0, b3 = plan_rows([B0, B3], measured=measured, epochs=1)
    assert b0['vanilla_images_per_s'] == 2000.0 and b0['gpu_hours'] is not None
    assert b3['gpu_hours'] is None
    (other,) = plan_rows([B3], measured=measured, epochs=1, throughput_model=B3)  # file says B0: not B3's
    assert other['gpu_hours'] is None


def test_json_without_a_model_is_taken_as_the_given_models(tmp_path, capsys):
    measured = read_measured(gpu_json(tmp_path, model=None))
    rows = plan_rows([v.name for v in VARIANTS], measured=measured, epochs=1)
    assert all(r['gpu_hours'] is None for r in rows)  # --all without --model: whose throughput is it?
    (row,) = plan_rows([B3], measured=measured, epochs=1, throughput_model=B3)
    assert row['vanilla_images_per_s'] == 2000.0
    assert main(['plan', '--model', B3, '--epochs', '1', '--measured', measured.path]) == 0
    assert "taken as --model's" in capsys.readouterr().out


def test_flag_throughput_wins_over_the_file(tmp_path):
    measured = read_measured(gpu_json(tmp_path))
    (row,) = plan_rows([B0], measured=measured, vanilla_images_per_s=1000.0, throughput_model=B0, epochs=1)
    assert row['vanilla_images_per_s'] == 1000.0 and row['throughput_source'] == '--vanilla-images-per-s'


# --- the GPU check's JSON ---

def test_measured_ratios_by_mode_and_pgd_steps(tmp_path):
    measured = read_measured(gpu_json(tmp_path))
    assert measured.device == 'NVIDIA H200' and measured.model == B0 and set(measured.rows) == {
        'vanilla', 'advprop-pgd1', 'advprop-pgd5', 'fast-advprop'}
    rows = plan_rows([v.name for v in VARIANTS], measured=measured, epochs=1)
    assert [r['measured_ratio'] for r in rows] == [2.5, 2.5, 2.5, None, 5.714, 5.714, 5.714, 5.714, 5.714]  # no pgd4
    assert plan_rows([B0], mode='vanilla', measured=measured, epochs=1)[0]['measured_ratio'] == 1.0
    assert plan_rows([B0], mode='fast-advprop', measured=measured, epochs=1)[0]['measured_ratio'] == 1.25
    assert plan_rows([B0], mode='adv-train', measured=measured, epochs=1)[0]['measured_ratio'] is None


def test_gpu_hours_use_the_measured_ratio(tmp_path, capsys):
    path = gpu_json(tmp_path)
    (row,) = plan_rows([B0], measured=read_measured(path), gpus=64, epochs=350)
    assert row['gpu_hours'] == pytest.approx(447_283_200 * 2.5 / 2000.0 / 3600)
    assert main(['plan', '--model', B0, '--recipe', 'paper', '--gpus', '64', '--measured', path]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith(f'| {B0}'))
    assert ' 2.50x |' in line and line.rstrip(' |').endswith('155.3')
    assert 'NVIDIA H200' in out


def test_fast_advprop_ratio_only_at_its_p_adv(tmp_path):
    path = write_json(tmp_path, {'device': 'gpu', 'rows': [
        {'name': 'fast-advprop', 'images_per_s': 1.0, 'ratio_to_vanilla': 1.3, 'p_adv': 0.5}]})
    measured = read_measured(path)
    assert plan_rows([B0], mode='fast-advprop', measured=measured, epochs=1)[0]['measured_ratio'] is None
    assert plan_rows([B0], mode='fast-advprop', p_adv=0.5, measured=measured, epochs=1)[0]['measured_ratio'] == 1.3


@pytest.mark.parametrize('content, says', [
    ('{not json', 'not JSON'),
    ('[1, 2]', 'not an object'),
    ({'rows': []}, '"device"'),
    ({'device': 'gpu'}, '"rows"'),
    ({'device': 'gpu', 'rows': {}}, '"rows"'),
    ({'device': 'gpu', 'rows': [{'images_per_s': 1.0, 'ratio_to_vanilla': 1.0}]}, 'no "name"'),
    ({'device': 'gpu', 'rows': [{'name': 'vanilla', 'ratio_to_vanilla': 1.0}]}, '"images_per_s"'),
    ({'device': 'gpu', 'rows': [{'name': 'vanilla', 'images_per_s': 'fast', 'ratio_to_vanilla': 1.0}]},
     '"images_per_s"'),
    ({'device': 'gpu', 'rows': [{'name': 'vanilla', 'images_per_s': 1.0, 'ratio_to_vanilla': -1}]},
     '"ratio_to_vanilla"'),
    ({'device': 'gpu', 'rows': [{'name': 'vanilla', 'images_per_s': 1.0, 'ratio_to_vanilla': True}]},
     '"ratio_to_vanilla"'),
    ({'device': 'gpu', 'rows': [{'name': 'x', 'images_per_s': 1, 'ratio_to_vanilla': 1}] * 2}, 'twice'),
])
def test_bad_json_is_one_line(tmp_path, capsys, content, says):
    path = write_json(tmp_path, content)
    with pytest.raises(MeasuredFileError, match=says):
        read_measured(path)
    assert main(['plan', '--model', B0, '--recipe', 'paper', '--measured', path]) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and path in err and says in err


def test_binary_file_is_one_line(tmp_path):
    path = tmp_path / 'gpu.json'
    path.write_bytes(b'\xff\xfe\x00garbage')
    with pytest.raises(MeasuredFileError, match='UTF-8'):
        read_measured(str(path))


def test_unknown_rows_are_ignored(tmp_path):
    path = write_json(tmp_path, {'device': 'gpu', 'rows': [
        {'name': 'advprop-pgd1-split-bn', 'images_per_s': 1.0, 'ratio_to_vanilla': 2.0}]})
    (row,) = plan_rows([B0], measured=read_measured(path), epochs=1)
    assert row['measured_ratio'] is None and row['gpu_hours'] is None


# --- bad input: one line, exit 1 ---

@pytest.mark.parametrize('argv, says', [
    (['--model', 'efficientnet_b9_advprop', '--recipe', 'paper'], 'unknown model'),
    (['--model', B0, '--mode', 'madry', '--recipe', 'paper'], 'unknown training mode'),
    (['--model', B0, '--gpus', '0', '--recipe', 'paper'], 'gpus'),
    (['--model', B0, '--batch-size', '0', '--recipe', 'paper'], 'batch size'),
    (['--model', B0], '--epochs'),
    (['--recipe', 'paper'], '--model'),
    (['--model', B0, '--recipe', 'paper', '--measured', '/nonexistent/gpu.json'], 'No such file'),
    (['--model', B0, '--recipe', 'paper', '--gpus', '1000000'], 'larger than'),
    (['--model', B0, '--recipe', 'paper', '--mode', 'vanilla', '--attack-steps', '2'], 'no PGD'),
    (['--model', B0, '--recipe', 'paper', '--mode', 'fast-advprop', '--p-adv', '0'], 'p_adv'),
    (['--model', B0, '--recipe', 'paper', '--vanilla-images-per-s', '0'], 'positive'),
    (['--model', B0, '--recipe', 'paper', '--attack-steps', '0'], 'attack steps'),
])
def test_bad_input_is_one_line_exit_1(capsys, argv, says):
    assert main(['plan'] + argv) == 1
    err = capsys.readouterr().err
    assert err.startswith('advprop-zoo plan: error: ') and err.count('\n') == 1 and says in err


def test_help_states_the_counting_rule(capsys):
    with pytest.raises(SystemExit):
        main(['plan', '--help'])
    out = ' '.join(capsys.readouterr().out.split())
    assert '2 + k' in out and 'fast-advprop' in out and 'input gradients only' in out
