"""``advprop-zoo train`` / ``python -m advprop_zoo_train``: parse the flags, run the embedded demo or one
training job, and turn the errors a user can fix into one line on stderr and exit status 1."""
import os
import sys
from typing import List, Optional

from advprop_zoo.errors import run_command

from .args import parse_args
from .distributed import cleanup
from .embedded import run_embedded
from .loop import train

__all__ = ['main']


def main(argv: Optional[List[str]] = None) -> int:
    """Train or fine-tune with AdvProp; with no flags, the embedded demo.

    ``argv`` are the flags after ``train`` (default: the process's); returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv

    def run() -> int:
        args = parse_args(argv)
        if args.data_dir is None and not getattr(args, 'dataset', None):  # the embedded demo; flags override it
            return run_embedded(argv)
        summary = train(args).summary
        if 'weights' in summary:  # the primary rank of a finished run
            print(f'done: val top-1 {summary["val_top1"]:.2f}%, weights {summary["weights"]}, curves {summary["plot"]}')
        elif not summary['finished'] and int(os.environ.get('RANK', '0')) == 0:
            print(f'stopped at step {summary["steps"]}; resume with --resume {summary["last_checkpoint"]}')
        return 0

    try:
        return run_command('advprop-zoo train', run)
    finally:
        cleanup()  # the process group is destroyed at exit, error or not


if __name__ == '__main__':
    raise SystemExit(main())
