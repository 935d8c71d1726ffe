"""Run logs: one CSV row per epoch (written as it happens), a JSON summary, and a plot of the curves."""
import csv
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from advprop_zoo.weights import atomic_write

__all__ = ['RunLog', 'SUMMARY_ONLY']

# row keys kept in the rows (summary.json's epochs_log, checkpoints) but not written to log.csv, whose
# columns are a file format: unreadable training images skipped in the epoch
SUMMARY_ONLY = ('unreadable_images',)


class RunLog:
    """``log.csv`` grows one row per epoch (flushed, so a crashed run keeps its history); ``summary.json``
    and ``curves.png`` are written atomically at the end.

    Not timm's ``update_summary``: it prefixes every column ``train_`` / ``eval_`` and puts ``lr`` last (the
    log.csv columns are a file format), and a resumed run rewrites the log from its checkpoint's rows."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.folder = Path(folder)
        self.enabled = enabled  # only the primary rank of a distributed run writes
        self.rows: List[Dict[str, Any]] = []

    def restore(self, rows: List[Dict[str, Any]]) -> None:
        """Continue a resumed run's log: rewrite log.csv from the checkpoint's rows."""
        self.rows = []
        for row in rows:
            self.append(row)

    def append(self, row: Dict[str, Any]) -> None:
        """Add one epoch's row; the first row (re)writes log.csv with its header (``SUMMARY_ONLY`` keys stay
        out of the CSV)."""
        if not self.enabled:
            self.rows.append(row)
            return
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
