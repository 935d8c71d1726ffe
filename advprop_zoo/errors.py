"""The project's errors and the one error boundary every console entry point runs its body in.

A user's mistake (a wrong path, a damaged file, a model name that does not exist, a read-only folder, a
full disk) must end in one line that names the file and the problem, a non-zero exit and nothing left
behind, never a Python traceback: tracebacks are for bugs, and for anyone who asks for them with
``ADVPROP_ZOO_DEBUG=1``.
"""
import errno
import os
import sys
from typing import Callable

__all__ = ['AdvPropZooError', 'DEBUG_ENV', 'describe_error', 'run_command']

DEBUG_ENV = 'ADVPROP_ZOO_DEBUG'  # set to 1: errors propagate with their traceback


class AdvPropZooError(Exception):
    """Base of the project's own errors: bad input, or a run that had to stop, said in one line."""


def describe_error(e: BaseException) -> str:
    """One line for an error: the project's own message, or the OS's with the file it concerns."""
    if isinstance(e, OSError) and not isinstance(e, AdvPropZooError):
        what = e.strerror or str(e)
        if e.errno == errno.EROFS:
            what = 'read-only file system'
        elif e.errno == errno.ENOSPC:
            what = 'no space left on device'
        names = [str(n) for n in (e.filename, e.filename2) if n]
        return f'{" -> ".join(names)}: {what}' if names else what
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run a command's ``body`` and return its exit code; the project's errors, bad arguments
    (ValueError) and the OS's errors become ``prog: error: <one line>`` on stderr and exit code 1."""
    try:
        return body()
    except (AdvPropZooError, ValueError, OSError) as e:
        if os.environ.get(DEBUG_ENV, '') not in ('', '0'):
            raise
        print(f'{prog}: error: {describe_error(e)}', file=sys.stderr)
        return 1
