"""Plain-text tables: one formatter for every command that prints results (Markdown pipe syntax,
so the same text reads in a terminal and pastes into a model card or an issue)."""
from typing import Any, Iterable, List, Sequence

__all__ = ['format_table']


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str = '') -> str:
    """Format ``rows`` under ``headers`` as an aligned Markdown table.

    ``align`` holds one character per column, ``l`` or ``r`` (default: numbers right, text left).
    """
    rows = [[_cell(c) for c in r] for r in rows]
    for r in rows:
        if len(r) != len(headers):
            raise ValueError(f'row {r} has {len(r)} cells for {len(headers)} headers')
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    if not align:
        align = ''.join('r' if rows and all(_numeric(r[i]) for r in rows) else 'l' for i in range(len(headers)))

    def line(cells: List[str]) -> str:
        return '| ' + ' | '.join(c.rjust(w) if a == 'r' else c.ljust(w) for c, w, a in zip(cells, widths, align)) + ' |'

    rule = '|' + '|'.join(('-' * (w + 1) + ':') if a == 'r' else ('-' * (w + 2)) for w, a in zip(widths, align)) + '|'
    return '\n'.join([line(list(headers)), rule] + [line(r) for r in rows])


def _cell(value: Any) -> str:
    if value is None:
        return '-'
    if isinstance(value, float):
        return f'{value:.3f}'.rstrip('0').rstrip('.') if value == value else 'nan'
    return str(value)


def _numeric(text: str) -> bool:
    try:
        float(text.replace(',', '').rstrip('%×x'))
        return True
    except ValueError:
        return text == '-'
