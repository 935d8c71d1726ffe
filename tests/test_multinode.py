"""Beyond one machine, on torchrun (gloo on CPU; the "nodes" are torchrun agents on this machine that meet
at a c10d rendezvous endpoint, as agents on separate hosts do):

- two agents x 1 process end with the same weights, bit for bit, as one agent x 2 processes;
- elastic: a rank SIGKILLed after a checkpoint makes torchrun (--max-restarts) restart the group, which
  resumes by itself (--resume auto, given from the first start) and ends bit-identical to an uninterrupted run;
- a hung rank: what the user sees, on one machine and on two.

Each test prints its wall time (job start included): run with -s to see them.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_distributed import ENV, RUN
from test_train import _make_folder

ROOT = Path(__file__).resolve().parents[1]
RUNNER = str(ROOT / 'tests' / 'elastic_fault_runner.py')
_i = RUN.index('--max-steps')
# 48 training images, 8 per rank x 2 ranks: 3 steps, one epoch, a finished run (final weights written);
# the same flags for every run here, the uninterrupted reference included
FLAGS = RUN[:_i] + RUN[_i + 2:] + ['--batch-size', '8', '--checkpoint-every', '1', '--resume', 'auto']
STEPS = 3
# torch >= 2.5 shares the c10d rendezvous store with the workers, and a restarted group then reads the
# previous attempt's gloo/nccl addresses from it ("connectFullMesh failed ... Connection refused" on every
# restart, or on some: pytorch/pytorch#135712, #167288); torchrun's own opt-out makes each attempt fresh
NO_SHARED_STORE = {'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'}


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return _make_folder(tmp_path_factory.mktemp('data'), classes=3, train=16, val=4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _c10d(rdzv_id: str, port: int, nnodes: int = 2) -> list:
    """One agent of ``nnodes`` meeting at 127.0.0.1:port (no --node-rank: c10d hands out the ranks)."""
    return ['--nnodes', str(nnodes), '--nproc-per-node', '1', '--rdzv-backend', 'c10d',
            '--rdzv-endpoint', f'127.0.0.1:{port}', '--rdzv-id', rdzv_id]


class Job:
    """A torchrun agent started in its own session (its workers with it), its output in a file."""

    def __init__(self, torchrun: list, program: list, log: Path, env: dict):
        self.log, self.t0, self.seconds, self.rc, self.killed = log, time.monotonic(), None, None, False
        with open(log, 'w') as f:
            self.proc = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', *torchrun, *program],
                                         cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def poll(self) -> bool:
        if self.rc is None and self.proc.poll() is not None:
            self.rc, self.seconds = self.proc.returncode, time.monotonic() - self.t0
        return self.rc is not None

    def kill(self) -> None:
        """Stop a job still running: SIGTERM to the agent (torchrun stops its workers), then SIGKILL to
        whatever of it is left (its workers run in sessions of their own)."""
        if self.poll():
            return
        self.killed, pids = True, _descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pids.append(self.proc.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.rc = self.proc.returncode

    @property
    def text(self) -> str:
        return self.log.read_text(errors='replace')


def _descendants(pid: int) -> list:
    """The processes under ``pid`` (Linux /proc), deepest first."""
    found = []
    for task in Path(f'/proc/{pid}/task').glob('*'):
        try:
            children = (task / 'children').read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += _descendants(child) + [child]
    return found


def _wait(jobs, timeout: float) -> None:
    """Wait for every job, at most ``timeout`` s from now; jobs still running then are killed (``killed``)."""
    deadline = time.monotonic() + timeout
    while not all(j.poll() for j in jobs) and time.monotonic() < deadline:
        time.sleep(0.2)
    for j in jobs:
        j.kill()


def _train(folder, out: Path) -> list:
    return ['-m', 'advprop_zoo_train', *FLAGS, '--data-dir', str(folder), '--output', str(out)]


def _faulty(folder, out: Path) -> list:
    return [RUNNER, *FLAGS, '--data-dir', str(folder), '--output', str(out)]


def _assert_same_weights(a: Path, b: Path) -> None:
    """The final (folded) weights and the last checkpoint's (dual BN) are equal tensor by tensor, bit for bit."""
    for name in ('model.safetensors', f'checkpoints/step-{STEPS:08d}/model.safetensors'):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys(), name
        differ = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
        assert not differ, f'{name}: {len(differ)} of {len(ta)} tensors differ, e.g. {differ[:3]}'


@pytest.fixture(scope='module')
def reference(folder, tmp_path_factory):
    """One agent, 2 processes, no fault: the run every other is compared with, and its wall time."""
    out = tmp_path_factory.mktemp('reference') / 'run'
    job = Job(['--standalone', '--nproc-per-node', '2'], _train(folder, out), out.parent / 'log.txt', ENV)
    _wait([job], 300)
    assert job.rc == 0, job.text[-3000:]
    return out, job.seconds


def test_two_agents_equal_one_agent_with_two_processes(folder, reference, tmp_path):
    ref, ref_s = reference
    out, port = tmp_path / 'run', _free_port()
    jobs = [Job(_c10d('equal', port), _train(folder, out), tmp_path / f'agent{i}.txt', ENV) for i in range(2)]
    _wait(jobs, 300)
    assert [j.rc for j in jobs] == [0, 0], '\n'.join(j.text[-2000:] for j in jobs)
    _assert_same_weights(ref, out)
    summary = (out / 'summary.json').read_text()
    assert '"world_size": 2' in summary and f'"steps": {STEPS}' in summary, summary
    print(f'{STEPS} AdvProp steps: 1 agent x 2 processes {ref_s:.1f} s; 2 agents x 1 process (c10d) '
          f'{max(j.seconds for j in jobs):.1f} s; weights bit-identical')


def test_a_killed_rank_restarts_the_group_which_resumes_bit_identically(folder, reference, tmp_path):
    """Rank 1 is SIGKILLed at step 2, once rank 0 has written step 1's checkpoint, in the first attempt only;
    both agents restart their workers (--max-restarts 2), which find step 1's checkpoint by --resume auto."""
    ref, ref_s = reference
    out, port = tmp_path / 'run', _free_port()
    env = {**ENV, **NO_SHARED_STORE, 'ADVPROP_TEST_FAULT': 'kill', 'ADVPROP_TEST_FAULT_STEP': '2'}
    jobs = [Job(_c10d('elastic', port) + ['--max-restarts', '2'], _faulty(folder, out), tmp_path / f'agent{i}.txt',
                env) for i in range(2)]
    _wait(jobs, 300)
    text = '\n'.join(j.text for j in jobs)
    assert [j.rc for j in jobs] == [0, 0], text[-4000:]
    assert 'rank 1: SIGKILL at step 2 (after step-00000001)' in text
    assert 'failed (exitcode: -9)' in text  # torchrun saw the kill ...
    resumed = re.findall(r'resumed from \S+/(step-\d+) at step (\d+)', text)
    assert resumed == [('step-00000001', '1')], text[-4000:]  # ... and the restarted group resumed, once
    _assert_same_weights(ref, out)
    print(f'{STEPS} AdvProp steps on 2 agents, rank 1 SIGKILLed at step 2 and the group restarted: '
          f'{max(j.seconds for j in jobs):.1f} s (uninterrupted, 1 agent x 2 processes: {ref_s:.1f} s); '
          f'weights bit-identical')


HANG_TIMEOUT = 20  # --dist-timeout
GRACE = 20  # how long the last agent may outlive the others


@pytest.fixture(scope='module')
def hung(folder, tmp_path_factory):
    """A rank sleeps forever at step 2 (outside any collective: a wedged data loader, a dead mount), on one
    machine (rank 1 of 1 agent x 2 processes) and on two (the rank of the agent that hosts the c10d
    rendezvous store, on a cluster the node --rdzv-endpoint names: here the agent started second, which
    c10d makes rank 1), all at once (they mostly wait). The last agent still running GRACE s after the
    others have ended is stopped."""
    tmp = tmp_path_factory.mktemp('hung')
    hang = {**ENV, 'ADVPROP_TEST_FAULT': 'hang', 'ADVPROP_TEST_FAULT_STEP': '2'}
    flags = ['--dist-timeout', str(HANG_TIMEOUT)]
    one = Job(['--standalone', '--nproc-per-node', '2'], _faulty(folder, tmp / 'one') + flags, tmp / 'one.txt',
              {**hang, 'ADVPROP_TEST_FAULT_RANK': '1'})
    port = _free_port()
    # c10d orders a rendezvous's nodes by address, then agent pid: on one machine the first started is rank 0
    other = Job(_c10d('hung', port) + ['--rdzv-conf', 'is_host=0'], _faulty(folder, tmp / 'two') + flags,
                tmp / 'other.txt', ENV)
    host = Job(_c10d('hung', port) + ['--rdzv-conf', 'is_host=1'], _faulty(folder, tmp / 'two') + flags,
               tmp / 'host.txt', {**hang, 'ADVPROP_TEST_FAULT_RANK': 'any'})
    jobs = [one, other, host]
    deadline = time.monotonic() + 240
    while sum(not j.poll() for j in jobs) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    _wait(jobs, GRACE)
    return one, other, host


def _hung_rank(job: Job) -> int:
    m = re.search(r'^rank (\d+): hanging at step 2$', job.text, re.M)
    assert m, job.text[-3000:]
    return int(m.group(1))


def _summary(text: str) -> str:
    """torchrun's failure summary, from the FAILED line to its closing rule."""
    m = re.search(r'^\S+ FAILED\n.*?^={20,}$', text, re.S | re.M)
    return m.group(0) if m else ''


def _root_cause(text: str) -> str:
    return _summary(text).partition('Root Cause')[2]


def _said(text: str) -> str:
    """What the ranks said about the failure: their error lines, and the last line of each traceback."""
    keep = r'^(\[rank\d+\]: )?(advprop-zoo train: error: .*|[\w.]*(Error|Exception): .*|Timeout \(.*\)!)$'
    return '\n'.join(m.group(0) for m in re.finditer(keep, text, re.M) if 'Warning' not in m.group(0))


def _ended(job: Job) -> bool:
    """Ended by itself (not stopped by the test), with a failure."""
    return not job.killed and job.rc not in (0, None)


@pytest.mark.slow
def test_a_hung_rank_ends_a_one_machine_job(hung):
    """The job ends, within --dist-timeout and start-up, and torchrun's summary lists the hung rank: rank 0's
    collective times out, it names rank 1 in one line and exits, and torchrun stops rank 1 (SIGTERM)."""
    one, _, _ = hung
    assert _hung_rank(one) == 1
    summary = _summary(one.text)
    assert _ended(one), one.text[-3000:]
    assert one.seconds < HANG_TIMEOUT + 90, one.seconds
    assert re.search(r'rank\s+: 1 ', summary), one.text[-3000:]
    print(f'hung rank, 1 agent x 2 processes, --dist-timeout {HANG_TIMEOUT}: job ended (exit {one.rc}) after '
          f'{one.seconds:.1f} s\n{_said(one.text)}\n{summary}')


@pytest.mark.slow
def test_a_hung_rank_ends_the_other_agent(hung):
    """On two machines, the agent of the rank that waited ends as on one (its root cause is its own rank, the
    one that waited and named the hung one)."""
    _, other, host = hung
    assert _ended(other), other.text[-3000:]
    assert other.seconds < HANG_TIMEOUT + 90, other.seconds
    assert _summary(other.text), other.text[-3000:]
    print(f'hung rank {_hung_rank(host)}, 2 agents x 1 process: the agent of the rank that waited ended (exit '
          f'{other.rc}) after {other.seconds:.1f} s\n{_said(other.text)}\n{_summary(other.text)}')


@pytest.mark.slow
def test_a_hung_rank_ends_its_own_agent(hung):
    """The hung rank's agent hosts the rendezvous store, and does not notice the other agent leaving: the hung
    rank's own watchdog (no batch finished in 2 x --dist-timeout) ends it, and so its agent."""
    _, other, host = hung
    print(f'hung rank {_hung_rank(host)}, 2 agents x 1 process: its agent (the rendezvous host) '
          + (f'was still running {GRACE} s after the other agent ended: stopped' if host.killed else
             f'ended (exit {host.rc}) after {host.seconds:.1f} s'))
    assert _ended(host), host.text[-3000:]
    assert host.seconds < other.seconds + GRACE


@pytest.mark.slow
def test_the_error_names_the_hung_rank_in_one_line(hung):
    """Rank 0 names the rank that did not answer at its monitored barrier; the hung rank names itself when its
    watchdog ends it."""
    one, other, host = hung
    hung_rank = _hung_rank(host)
    named = [(one, 1), (host, hung_rank)] + ([(other, 1)] if hung_rank == 1 else [])
    for job, rank in named:
        assert re.search(rf'^advprop-zoo train: error: .*\brank {rank}\b', job.text, re.M), job.text[-3000:]
