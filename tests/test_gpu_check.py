"""benchmarks/gpu.py, the one-command GPU check, run at toy size on the CPU (``--device cpu --smoke``): it runs end
to end, prints one table and writes the JSON that ``advprop-zoo plan --measured`` reads. Shapes, not timings."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROW_NAMES = ['vanilla', 'advprop-pgd1', 'advprop-pgd5', 'fast-advprop']


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp('gpu-check') / 'check.json'
    env = {**os.environ, 'HF_HUB_OFFLINE': '1'}
    proc = subprocess.run([sys.executable, 'benchmarks/gpu.py', '--device', 'cpu', '--smoke', '--json', str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, out


def _positive(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_prints_one_table_with_every_check(smoke):
    stdout, _ = smoke
    lines = stdout.splitlines()
    table_at = [i for i, line in enumerate(lines) if line.startswith('|')]
    assert table_at and table_at == list(range(table_at[0], table_at[-1] + 1)), 'one contiguous table'
    table = [lines[i] for i in table_at]
    assert [c.strip() for c in table[0].strip('|').split('|')] == \
        ['check', 'measured', 'vs anchor', 'peak GiB', 'goal', 'result']
    body = table[2:]
    assert len(body) == 1 + 4 + 2 + 1  # cuda tests, 4 train rows, eval anchor + ours, loader
    assert 'cuda tests' in body[0] and 'not run' in body[0] and 'a CUDA device' in body[0] and 'SKIP' in body[0]
    assert "timm's train step (anchor)" in body[1] and '1.00x' in body[1]
    assert 'PGD-1' in body[2] and '<= 2.7x' in body[2] and ('PASS' in body[2] or 'MISS' in body[2])
    assert 'PGD-5' in body[3]
    assert 'fast-advprop' in body[4] and '<= 1.3x' in body[4]
    assert 'validate.py' in body[5] and 'evaluate_accuracy' in body[6] and '>= 1.0x' in body[6]
    assert 'loader' in body[7]
    assert 'SMOKE' in stdout  # a toy run says it is one


def test_json_has_the_shape_plan_reads(smoke):
    _, out = smoke
    data = json.loads(out.read_text())
    assert isinstance(data['device'], str) and data['device'].startswith('cpu')
    assert data['model'] == 'test_efficientnet' and data['settings']['smoke'] is True
    assert [r['name'] for r in data['rows']] == ROW_NAMES
    for row in data['rows']:
        for key in ('images_per_s', 'ratio_to_vanilla', 'peak_mem_gib'):
            assert _positive(row[key]), (row['name'], key, row[key])
    vanilla = data['rows'][0]
    assert vanilla['ratio_to_vanilla'] == 1.0 and vanilla['met'] is None
    for row in data['rows'][1:]:  # ratio = step time over vanilla's = vanilla images/s over the row's
        assert row['ratio_to_vanilla'] == pytest.approx(vanilla['images_per_s'] / row['images_per_s'], rel=1e-9)
    goals = {r['name']: r['goal_max_ratio'] for r in data['rows']}
    assert goals == {'vanilla': None, 'advprop-pgd1': 2.7, 'advprop-pgd5': None, 'fast-advprop': 1.3}
    assert data['rows'][1]['met'] == (data['rows'][1]['ratio_to_vanilla'] <= 2.7)
    assert data['rows'][3]['p_adv'] == 0.2 and data['rows'][1]['attack'] == 'PGD1_eps1'
    assert data['rows'][2]['attack'] == 'PGD5_eps4'
    ev = data['eval']
    assert _positive(ev['timm_images_per_s']) and _positive(ev['advprop_zoo_images_per_s'])
    assert ev['ratio'] == pytest.approx(ev['advprop_zoo_images_per_s'] / ev['timm_images_per_s'])
    assert ev['met'] == (ev['ratio'] >= 1.0)
    assert _positive(data['loader']['images_per_s']) and data['loader']['images'] == 16
    assert data['cuda_tests']['ran'] is False and 'CUDA' in data['cuda_tests']['reason']
    assert set(data['seconds']) == {'train_compile', 'cuda_tests_wait', 'train_measure', 'eval', 'loader', 'total'}
    assert data['complete'] is True


def test_plan_reads_the_json(smoke):
    from advprop_zoo import plan
    _, out = smoke
    measured = plan.read_measured(str(out))
    assert set(measured.rows) == set(ROW_NAMES)
    assert measured.rows['fast-advprop'].p_adv == 0.2 and measured.model == 'test_efficientnet'


def test_refuses_a_cpu_run_that_is_not_a_smoke_run():
    proc = subprocess.run([sys.executable, 'benchmarks/gpu.py', '--device', 'cpu'], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    assert proc.returncode == 2 and '--smoke' in proc.stderr
