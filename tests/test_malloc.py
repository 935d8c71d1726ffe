"""keep_freed_memory: freed activation memory stays in the process (what spares the page faults)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = '''
import sys, torch
from advprop_zoo.malloc import keep_freed_memory
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS:')).split()[1]) // 1024
if sys.argv[1] == 'reuse':
    assert keep_freed_memory()
t = torch.ones(256 << 20 >> 2)  # a 256 MiB activation
held = rss()
del t
print(held - rss())  # MiB handed back to the OS by the free
'''


@pytest.mark.skipif(sys.platform != 'linux', reason='glibc malloc tuning is Linux-only (it returns False elsewhere)')
def test_freed_blocks_stay_in_the_process_only_when_asked():
    returned = {}
    for mode in ('default', 'reuse'):
        run = subprocess.run([sys.executable, '-c', PROBE, mode], cwd=ROOT, capture_output=True, text=True, check=True)
        returned[mode] = int(run.stdout.split()[-1])
    assert returned['default'] > 200, returned  # glibc's default: the block was an mmap, unmapped on free
    assert returned['reuse'] < 32, returned  # kept for the next pass: no page faults to fill it again
