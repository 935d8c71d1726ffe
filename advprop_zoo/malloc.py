"""CPU memory reuse: keep freed activation memory in the process instead of handing it back to the OS.

PyTorch takes every CPU activation and gradient from ``malloc``. glibc serves big blocks with a fresh
``mmap`` and unmaps them on ``free``, so each forward and backward page-faults all of its activations
in again; on a B0 at 224 px that is more than half of an eval forward and a good share of an AdvProp
step, whose attack and two training passes allocate three times (``benchmarks/infer.py``,
``benchmarks/train_step.py``). GPU code never pays this: the CUDA caching allocator keeps its blocks.
Telling glibc to do the same is one ``mallopt`` call, the in-process form of the
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` environment setting. The cost is that the process
keeps its peak memory (as with the CUDA allocator) rather than giving it back between steps.
"""
import ctypes
import ctypes.util
import platform

__all__ = ['keep_freed_memory']

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_MAX = -4
_INT_MAX = 2 ** 31 - 1


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every block from its heap and keep freed memory for reuse.

    Process-wide and lasting; call it once at startup of a CPU training or inference process. Returns
    False, changing nothing, where the C library is not glibc (macOS, Windows, musl).
    """
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return False
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    # no mmap'd blocks: big activations come from the heap, so freeing them leaves them there ...
    # ... and the heap top is only trimmed past 2 GiB of free memory
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
