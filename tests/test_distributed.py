"""torchrun / gloo on CPU: 2 processes equal 1 process on the same global batch; a dead rank ends the job."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from advprop_zoo_train.checkpoint import latest_checkpoint
from test_train import _make_folder

ROOT = Path(__file__).resolve().parents[1]
# deterministic: no dropout, untargeted attack from the clean image, so both runs compute one function
# plain SGD: parameter differences are then gradient differences (Adam's normalised steps would turn
# rounding noise in near-zero gradients into lr-sized differences)
RUN = ['--model', 'test_efficientnet', '--input-size', '3', '32', '32', '--epochs', '1', '--opt', 'momentum',
       '--momentum', '0', '--weight-decay', '0', '--lr', '0.05', '--sched', 'cosine', '--warmup-epochs', '0', '--workers', '0', '--scale', '0.5', '1.0',
       '--drop', '0', '--drop-path', '0', '--mode', 'advprop', '--attack-eps', '2', '--attack-steps', '2',
       '--untargeted', '--no-random-start', '--split-bn', '--max-steps', '1', '--no-progress']
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return _make_folder(tmp_path_factory.mktemp('data'), classes=3, train=16, val=4)


def _torchrun(nproc, args, timeout=300):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize('mode', [[], ['--mode', 'fast-advprop', '--p-adv', '1']], ids=['advprop', 'fast-advprop'])
def test_two_ranks_equal_one_process_with_the_global_batch(folder, tmp_path, mode):
    """One AdvProp step (PGD-2 through the auxiliary BNs, split-BN pass, sync BNs, DDP gradient averaging)
    on 2 ranks x 8 images against 1 process x 16. Stated tolerance: 1e-5 absolute, 1e-4 relative (the
    order of the gradient all-reduce and of the BN statistic sums). Over several steps the difference
    grows (BN nets amplify rounding, and sign() in the attack can flip on near-zero input gradients).

    Fast AdvProp (every image attacked, so both runs attack the same images) back-propagates its clean
    pass outside DDP: this checks DDP still averages those gradients, the main BNs' included."""
    run = RUN + mode
    one = subprocess.run([sys.executable, '-m', 'advprop_zoo_train', *run, '--data-dir', str(folder),
                          '--batch-size', '16', '--output', str(tmp_path / 'one')],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _torchrun(2, ['-m', 'advprop_zoo_train', *run, '--data-dir', str(folder), '--batch-size', '8',
                        '--output', str(tmp_path / 'two')])
    assert two.returncode == 0, two.stderr[-3000:]
    ca, cb = (latest_checkpoint(tmp_path / run / 'checkpoints') for run in ('one', 'two'))
    assert ca.name == cb.name == 'step-00000001'
    a, b = load_file(str(ca / 'model.safetensors')), load_file(str(cb / 'model.safetensors'))
    init = _initial_dual_state()
    assert a.keys() == b.keys() == init.keys()
    worst = 0.0
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
            worst = max(worst, (a[k] - b[k]).abs().max().item())
        else:
            assert torch.equal(a[k], b[k]), k
    aux = [k for k in a if '.aux_bn.0.running_' in k]
    assert aux
    for k in aux + [k.replace('.aux_bn.0', '') for k in aux]:  # both branches' statistics moved, and agree
        assert not torch.equal(a[k], init[k])
    assert not any(torch.equal(a[k], a[k.replace('.aux_bn.0', '')]) for k in aux if 'running_mean' in k)
    assert sorted(p.name for p in (tmp_path / 'two' / 'checkpoints').iterdir()) == ['step-00000001']  # rank 0 only
    print(f'max |1 process - 2 processes| over all tensors after one step: {worst:.2e}')


def _initial_dual_state():
    import timm
    from advprop_zoo.dual_bn import to_dual_bn
    torch.manual_seed(0)
    return to_dual_bn(timm.create_model('test_efficientnet', num_classes=3, drop_rate=0.0,
                                        drop_path_rate=0.0)).state_dict()


def test_a_dead_rank_ends_the_job_with_a_message(folder, tmp_path):
    t0 = time.time()
    i = RUN.index('--max-steps')
    full_run = RUN[:i] + RUN[i + 2:]
    run = _torchrun(2, [str(ROOT / 'tests' / 'ddp_fault_runner.py'), *full_run, '--data-dir', str(folder),
                        '--batch-size', '8', '--output', str(tmp_path), '--dist-timeout', '60'], timeout=240)
    assert run.returncode != 0
    assert time.time() - t0 < 200  # ended, did not hang
    text = run.stderr + run.stdout
    assert 'ddp_fault_runner.py FAILED' in text  # torchrun's summary names the job ...
    assert 'rank      : 1' in text and 'exitcode  : 3' in text  # ... the rank that died and how


def test_a_nan_on_one_rank_stops_every_rank_at_once(folder, tmp_path):
    """Rank 1 alone gets a non-finite loss (per-rank BN statistics, so nothing else spreads it): the
    finiteness flags are all-reduced at the next check, and both ranks stop with the message in seconds
    instead of one rank raising while the other waits in a collective until --dist-timeout."""
    i = RUN.index('--max-steps')
    full_run = RUN[:i] + RUN[i + 2:]
    env = {**ENV, 'ADVPROP_TEST_FAULT': 'nan'}
    t0 = time.time()
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(ROOT / 'tests' / 'ddp_fault_runner.py'), *full_run, '--no-sync-bn', '--data-dir', str(folder),
           '--batch-size', '8', '--output', str(tmp_path), '--dist-timeout', '120']
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.time() - t0
    text = run.stderr + run.stdout
    assert run.returncode != 0, text[-2000:]
    assert text.count('non-finite loss at epoch 1, step 2') >= 2, text[-3000:]  # both ranks say it
    assert elapsed < 60, elapsed  # well inside --dist-timeout: nobody waited on a collective
    assert not list((tmp_path / 'checkpoints').glob('step-*'))
    print(f'NaN on rank 1: both ranks stopped after {elapsed:.1f} s (job start included)')


@pytest.mark.slow
def test_the_demo_under_torchrun_prints_one_table_of_the_whole_set(tmp_path):
    """The embedded demo (one short mode) on 2 ranks: rank 0 alone measures the whole 360-image validation set
    (clean, PGD, APGD-CE, corruptions) and prints the one table; the other rank prints nothing of it."""
    run = _torchrun(2, ['-m', 'advprop_zoo_train', '--mode', 'vanilla', '--epochs', '1', '--output',
                        str(tmp_path / 'demo')], timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert out.count('| mode ') == 1 and out.count('[vanilla seed 0]') == 1, out[-3000:]
    assert '360 val images' in out and 'APGD-CE eps4 top-1 %' in out
    row = next(line for line in out.splitlines() if line.startswith('| vanilla'))
    clean, pgd, apgd = (float(c) for c in row.strip('|').split('|')[1:4])
    for value in (clean, pgd, apgd):  # whole-set percentages: k / 360, not a 180-image shard's padded count
        assert abs(value * 3.6 - round(value * 3.6)) < 0.02, row
    assert apgd <= clean  # AutoAttack attacks the clean-correct images only


def test_the_step_watchdog_ends_a_hung_process_naming_its_rank():
    """No batch within its timeout: one line naming the rank, the threads' stacks, exit status 1; petted in
    time, it never fires (and it is not armed before the first pet)."""
    code = ('import time, sys\n'
            'from advprop_zoo_train.distributed import StepWatchdog\n'
            'w = StepWatchdog(1.5, rank=3)\n'
            'time.sleep(3)  # not armed yet\n'
            'for _ in range(6):\n'
            '    w.pet(); time.sleep(0.5)\n'
            'print("petted", flush=True)\n'
            'if sys.argv[1] == "hang":\n'
            '    time.sleep(60)\n'
            'w.stop()\n')
    t0 = time.time()
    hung = subprocess.run([sys.executable, '-c', code, 'hang'], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=60)
    assert hung.returncode == 1 and time.time() - t0 < 20, hung.stderr
    first = hung.stderr.splitlines()[0]
    assert first.startswith('advprop-zoo train: error: rank 3 is hung: no batch finished in 1.5 s'), hung.stderr
    assert 'time.sleep(60)' in hung.stderr or 'line 9' in hung.stderr  # the stack of the hung thread
    fine = subprocess.run([sys.executable, '-c', code, 'finish'], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=60)
    assert fine.returncode == 0 and 'petted' in fine.stdout and not fine.stderr, fine.stderr


def test_collective_failure_only_speaks_for_a_collectives_error():
    from advprop_zoo_train.distributed import DistInfo, collective_failure
    assert collective_failure(RuntimeError('Timed out waiting 20000ms for recv'), DistInfo()) is None  # 1 process
    two = DistInfo(rank=0, world_size=2, monitor=object())
    assert collective_failure(RuntimeError('mat1 and mat2 shapes cannot be multiplied'), two) is None
