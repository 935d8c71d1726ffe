"""Run logs: per-epoch rows (log.csv, and timm's summary.csv through its own ``update_summary``), a JSON
summary, a plot of the curves, optional Weights & Biases, and the progress of an epoch as a person or a
log file wants it."""
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from timm.utils import update_summary
from tqdm import tqdm

from advprop_zoo.weights import atomic_write

__all__ = ['RunLog', 'SUMMARY_ONLY', 'Progress', 'start_wandb']

# row keys kept in the rows (summary.json's epochs_log, checkpoints) but not written to log.csv, whose
# columns are a file format: unreadable training images skipped in the epoch, validation top-5
SUMMARY_ONLY = ('unreadable_images', 'val_top5')


class RunLog:
    """``log.csv`` grows one row per epoch (flushed, so a crashed run keeps its history); ``summary.json``
    and ``curves.png`` are written atomically at the end.

    Not timm's ``update_summary``: it prefixes every column ``train_`` / ``eval_`` and puts ``lr`` last (the
    log.csv columns are a file format), and a resumed run rewrites the log from its checkpoint's rows."""

    def __init__(self, folder: Path, enabled: bool = True, wandb: bool = False):
        self.folder = Path(folder)
        self.enabled = enabled  # only the primary rank of a distributed run writes
        self.wandb = wandb and enabled  # rows also go to Weights & Biases (start_wandb was called)
        self.rows: List[Dict[str, Any]] = []

    def restore(self, rows: List[Dict[str, Any]]) -> None:
        """Continue a resumed run's log: rewrite log.csv and summary.csv from the checkpoint's rows."""
        self.rows = []
        for row in rows:
            self.append(row, replay=True)

    def append(self, row: Dict[str, Any], replay: bool = False) -> None:
        """Add one epoch's row; the first row (re)writes log.csv with its header (``SUMMARY_ONLY`` keys stay
        out of the CSV). summary.csv gets the same epoch as timm's train.py writes it (``train_*``,
        ``eval_*``, ``lr``); W&B gets it too, unless the row is replayed on resume."""
        if not self.enabled:
            self.rows.append(row)
            return
        train = {k: row[k] for k in ('train_loss', 'clean_loss', 'adv_loss') if row.get(k) is not None}
        evals = {k[4:]: row[k] for k in ('val_top1', 'val_top5', 'val_loss') if row.get(k) is not None}
        if not self.rows:
            (self.folder / 'summary.csv').unlink(missing_ok=True)
        update_summary(row['epoch'], train, evals, self.folder / 'summary.csv', lr=row.get('lr'),
                       write_header=not self.rows, log_wandb=self.wandb and not replay)
        path = self.folder / 'log.csv'
        new = not self.rows
        columns = {k: '' if v is None else v for k, v in row.items() if k not in SUMMARY_ONLY}
        with open(path, 'w' if new else 'a', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(columns))
            if new:
                writer.writeheader()
            writer.writerow(columns)
        self.rows.append(row)

    def write_summary(self, summary: Dict[str, Any]) -> Path:
        """``summary.json``: ``summary`` plus every epoch's row."""
        path = self.folder / 'summary.json'
        with atomic_write(path, 'w') as f:
            json.dump({**summary, 'epochs_log': self.rows}, f, indent=2, default=str)
        return path

    def plot(self, title: str = '') -> Optional[str]:
        """Loss and validation top-1 against epoch; None (and no file) without matplotlib."""
        try:  # optional (the [train] extra): without it a run has no plot, nothing else changes
            import matplotlib
            matplotlib.use('Agg')
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        epochs = [r['epoch'] for r in self.rows]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        ax_loss.plot(epochs, [r['clean_loss'] for r in self.rows], label='clean loss')
        if any(r.get('adv_loss') is not None for r in self.rows):
            ax_loss.plot(epochs, [r['adv_loss'] for r in self.rows], label='adversarial loss')
        ax_loss.set_xlabel('epoch')
        ax_loss.set_ylabel('loss')
        ax_loss.legend()
        ax_acc.plot(epochs, [r['val_top1'] for r in self.rows], label='val top-1', color='tab:green')
        ax_acc.set_xlabel('epoch')
        ax_acc.set_ylabel('top-1 (%)')
        ax_acc.legend()
        fig.suptitle(title)
        fig.tight_layout()
        path = self.folder / 'curves.png'
        with atomic_write(path) as f:
            fig.savefig(f, format='png', dpi=100)
        plt.close(fig)
        return str(path)


def start_wandb(args: Any, folder: Path) -> None:
    """Start a Weights & Biases run for ``--log-wandb`` (``WANDB_MODE=offline`` keeps it local)."""
    try:
        import wandb  # optional: only --log-wandb needs it
    except ImportError:
        raise ValueError('--log-wandb needs the wandb package: pip install wandb') from None
    import timm.utils.summary as timm_summary
    timm_summary.wandb = wandb  # timm's update_summary logs through its own module-level name
    wandb.init(project='advprop-zoo', name=folder.name, dir=str(folder), config=vars(args))


class Progress:
    """An epoch's progress: a tqdm bar on a terminal, one plain line every ``interval`` batches otherwise
    (a log file gets lines, not carriage-return frames). ``values`` is only called when something is
    shown, so its host syncs (``.item()``) happen once per interval, not per batch."""

    def __init__(self, desc: str, total: int, start: int, interval: int, enabled: bool, images_per_batch: int,
                 stream=None):
        self.desc, self.total, self.interval, self.enabled = desc, total, max(1, interval), enabled
        self.images_per_batch = images_per_batch
        self.stream = stream or sys.stdout
        self.t0, self.done = time.perf_counter(), 0
        self.bar = tqdm(total=total, initial=start, desc=desc, unit='batch', leave=False, dynamic_ncols=True) \
            if enabled and self.stream.isatty() else None

    def update(self, batch: int, values: Callable[[], Dict[str, float]]) -> None:
        """Batch ``batch`` (1-based within the epoch) is done."""
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
        if self.done % self.interval and batch != self.total:
            return
        rate = self.done * self.images_per_batch / max(time.perf_counter() - self.t0, 1e-9)
        shown = {**{k: f'{v:.4f}' for k, v in values().items()}, 'img/s': f'{rate:.0f}'}
        if self.bar is not None:
            self.bar.set_postfix(shown)
        else:
            print(f'{self.desc} [{batch}/{self.total}] ' + ' '.join(f'{k} {v}' for k, v in shown.items()),
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
