"""Model-name checks shared by every command: an unknown name fails with close suggestions."""
import difflib
import re
from typing import Iterable, Optional

import timm

from .errors import AdvPropZooError

__all__ = ['UnknownModelError', 'check_model_name']


class UnknownModelError(AdvPropZooError, ValueError):
    """A model name that is not in timm's registry (after ``import advprop_zoo``)."""


def check_model_name(name: str, choices: Optional[Iterable[str]] = None) -> str:
    """Return ``name`` (without a ``.tag``) if it is a registered model, else raise UnknownModelError
    naming the closest registered names. TF scope names such as ``efficientnet-b3`` point to the zoo."""
    base = name.split('.', 1)[0]
    choices = list(choices) if choices is not None else timm.list_models()
    if base in choices:
        return base
    hints = difflib.get_close_matches(base, choices, n=3, cutoff=0.6)
    m = re.fullmatch(r'(?:tf[_-])?efficientnet[_-]b(\d+)(?:[_-]advprop)?', base.lower())
    if m and f'efficientnet_b{m.group(1)}_advprop' in choices:
        hints.insert(0, f'efficientnet_b{m.group(1)}_advprop')
    hints = list(dict.fromkeys(hints))
    hint = f"; did you mean {', '.join(repr(h) for h in hints)}?" if hints else ''
    raise UnknownModelError(f'unknown model {name!r}{hint}')
