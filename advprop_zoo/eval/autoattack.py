"""AutoAttack (Croce & Hein, ICML 2020) on a model as the suite evaluates it, from the ``pyautoattack`` package.

The attacks are the package's own objects (``pyautoattack.AutoAttack`` builds and configures them for a
version: ``standard`` = APGD-CE, APGD-T, FAB-T, Square; ``plus``; ``rand``), run over the ensemble the way
the package's ``run_standard_evaluation`` runs them: a clean pass, then each attack on the images still
classified correctly, in batches of the still-robust indices in order, each batch's attack seeded with the
adversary's seed. So for the same model, images, batch size and seed the robust accuracy and every image's
outcome are the package's (``tests/test_autoattack.py`` checks this against the package's own call). What
this loop adds is what the package computes but does not return: the images each attack broke and the
robust accuracy after each attack, and a little speed: the clean pass under ``torch.inference_mode``, no
weight gradients (FAB's ``backward`` would otherwise compute them), none of the package's start-up checks
for randomised / dynamic defenses (seven forward passes of a batch, one of them under ``sys.settrace``;
the suite's models are deterministic timm models), and the fused eval model where the suite uses it.

AutoAttack works on images in [0, 1]; ``PixelSpaceModel`` puts the model's mean / std (and channels_last,
autocast) inside the model, so the budget ``eps`` (0-255 pixel units, ``4`` = 4/255) is the package's L-inf
eps in that space. Images are kept on the host as uint8 where they are exactly k/255 (timm's eval transform
without normalisation: always), a quarter of float32's memory for RobustBench's 5000 images at 224 px.
"""
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ..errors import AdvPropZooError

__all__ = ['AUTOATTACK_VERSIONS', 'AUTOATTACK_ATTACKS', 'INSTALL_HINT', 'AutoAttackMissing', 'require_autoattack',
           'autoattack_version', 'check_autoattack', 'check_autoattack_classes', 'version_attacks', 'PixelSpaceModel',
           'autoattack_adversary', 'AutoAttackResult', 'run_autoattack', 'PixelImages']

AUTOATTACK_VERSIONS = ('standard', 'plus', 'rand')  # the package's versions; 'custom' takes a list of attacks
AUTOATTACK_ATTACKS = ('apgd-ce', 'apgd-dlr', 'fab', 'square', 'apgd-t', 'fab-t')
# the package's own lists (AutoAttack._set_version), for checks made before the package is imported
_VERSION_ATTACKS = {'standard': ('apgd-ce', 'apgd-t', 'fab-t', 'square'),
                    'plus': ('apgd-ce', 'apgd-dlr', 'fab', 'square', 'apgd-t', 'fab-t'),
                    'rand': ('apgd-ce', 'apgd-dlr')}
_TARGETS = 9  # target classes of APGD-T and FAB-T in every version
INSTALL_HINT = 'pip install "advprop-zoo[robust]" (or pip install pyautoattack)'


class AutoAttackMissing(AdvPropZooError, ImportError):
    """AutoAttack was asked for but its package (the ``robust`` extra) is not installed."""


def require_autoattack():
    """The ``pyautoattack`` module; one line saying how to install it when it is missing."""
    try:
        import pyautoattack
    except ImportError:
        raise AutoAttackMissing(f'AutoAttack needs the pyautoattack package, which is not installed: {INSTALL_HINT}') \
            from None
    return pyautoattack


def version_attacks(version: str, attacks: Optional[Sequence[str]] = None) -> List[str]:
    """The attacks a version runs, in order (``custom``: ``attacks``)."""
    return list(attacks or ()) if version == 'custom' else list(_VERSION_ATTACKS[version])


def check_autoattack(version: str, eps: Sequence[float], attacks: Optional[Sequence[str]] = None) -> None:
    """One line (ValueError) for an unknown version, an attack list that does not fit the version, or an eps
    outside (0, 255] pixel units."""
    if version not in AUTOATTACK_VERSIONS + ('custom',):
        raise ValueError(f'unknown --autoattack-version {version!r}; choose one of {", ".join(AUTOATTACK_VERSIONS)} '
                         '(or custom with --autoattack-attacks)')
    if version == 'custom':
        if not attacks:
            raise ValueError('--autoattack-version custom needs --autoattack-attacks, e.g. apgd-ce,apgd-t')
        unknown = [a for a in attacks if a not in AUTOATTACK_ATTACKS]
        if unknown:
            raise ValueError(f'unknown AutoAttack attack {unknown[0]!r}; choose from {", ".join(AUTOATTACK_ATTACKS)}')
        if len(set(attacks)) != len(attacks):
            raise ValueError('--autoattack-attacks names an attack twice')
    elif attacks:
        raise ValueError(f'--autoattack-attacks needs --autoattack-version custom (version {version} runs '
                         f'{", ".join(_VERSION_ATTACKS[version])})')
    if not eps:
        raise ValueError('AutoAttack needs at least one --eps value')
    for e in eps:
        if not 0 < e <= 255:  # NaN too
            raise ValueError(f'AutoAttack --eps must be > 0 and <= 255 (0-255 pixel units, 4 = 4/255), got {e:g}')


def check_autoattack_classes(version: str, num_classes: int, attacks: Optional[Sequence[str]] = None) -> None:
    """AutoAttack's DLR losses read the 3rd (targeted: 4th) largest logit and its targeted attacks take the
    9 runner-up classes as targets: a model with fewer classes fails in one line, before any attack."""
    run = version_attacks(version, attacks)
    need = 0
    if 'apgd-t' in run or 'fab-t' in run:
        need = _TARGETS + 1
    elif 'apgd-dlr' in run:
        need = 3
    if num_classes < need:
        which = ', '.join(a for a in run if a in ('apgd-t', 'fab-t', 'apgd-dlr'))
        raise ValueError(f'AutoAttack {version} ({which}) needs a model with at least {need} classes; this one has '
                         f'{num_classes} (use --autoattack-version custom --autoattack-attacks apgd-ce,...)')


def autoattack_version() -> Optional[str]:
    """The installed pyautoattack's version, or None."""
    try:
        return require_autoattack().__version__
    except (AutoAttackMissing, AttributeError):
        return None


class PixelSpaceModel(nn.Module):
    """``model`` taking images in [0, 1]: normalised with ``mean`` / ``std`` inside, optionally channels_last and
    under autocast (logits returned in float32). Parameters are frozen: AutoAttack needs input gradients only."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], channels_last: bool = False,
                 autocast_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        ref = next(self.model.parameters(), None)
        device = ref.device if ref is not None else None
        self.register_buffer('mean', torch.tensor(list(mean), device=device).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(list(std), device=device).view(1, -1, 1, 1), persistent=False)
        self.channels_last = channels_last
        self.autocast_dtype = autocast_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast_dtype is not None:
            with torch.autocast(x.device.type, dtype=self.autocast_dtype):
                return self.model(x).float()
        return self.model(x)


def autoattack_adversary(model: nn.Module, eps: float, version: str = 'standard',
                         attacks: Optional[Sequence[str]] = None, seed: int = 0,
                         device: Optional[torch.device] = None):
    """The package's ``AutoAttack`` for ``model`` (inputs in [0, 1]; ``PixelSpaceModel``) at ``eps`` in 0-255
    pixel units, L-inf, ``version`` (``custom``: ``attacks``), seeded (the package's default, None, seeds every
    attack from the clock)."""
    check_autoattack(version, [eps], attacks)
    aa = require_autoattack()
    if device is None:
        ref = next(model.parameters(), None)
        device = ref.device if ref is not None else torch.device('cpu')
    adversary = aa.AutoAttack(model, attacks=list(attacks) if version == 'custom' else None, device=device,
                              eps=eps / 255, norm='Linf', seed=seed, version=version)
    adversary.verbose = False
    return adversary


class PixelImages:
    """Images in [0, 1] held on the host: uint8 while every batch is exactly k/255 (timm's eval transform
    without normalisation), float32 otherwise. ``batch(idx, device)`` gives float32 images on ``device``,
    the same values ``x / 255`` of a ToTensor'd uint8 image has."""

    def __init__(self):
        self._parts: List[torch.Tensor] = []
        self._exact = True
        self._data: Optional[torch.Tensor] = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to('cpu', torch.float32)
        if self._exact:
            u8 = (x * 255).round_().clamp_(0, 255).to(torch.uint8)
            if torch.equal(u8.float().div_(255), x):
                self._parts.append(u8)
                return
            self._exact = False
            self._parts = [p.float().div_(255) for p in self._parts]
        self._parts.append(x)

    def done(self) -> 'PixelImages':
        self._data = torch.cat(self._parts) if self._parts else torch.empty(0)
        self._parts = []
        return self

    def __len__(self) -> int:
        return 0 if self._data is None else len(self._data)

    @property
    def data(self) -> torch.Tensor:
        return self._data

    def batch(self, idx: Any, device: torch.device) -> torch.Tensor:
        x = self._data[idx].to(device, non_blocking=True)
        return x.float().div_(255) if x.dtype == torch.uint8 else x

    def float(self) -> torch.Tensor:
        """All images as float32 in [0, 1] (what the package's own call takes)."""
        return self._data.float().div_(255) if self._data.dtype == torch.uint8 else self._data


@dataclass
class AutoAttackResult:
    """One AutoAttack run: ``clean`` / ``robust`` per image (bool, in the images' order), and per attack of the
    ensemble, in the order run: the indices it broke (clean-correct images it made wrong, that no earlier attack
    had), the robust accuracy (%) after it and its seconds. Attacks the run never reached (no robust image
    left) are listed with nothing broken and the final accuracy."""
    attacks: List[str]
    clean: torch.Tensor
    robust: torch.Tensor
    broken: Dict[str, List[int]] = field(default_factory=dict)
    after: Dict[str, float] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)
    clean_seconds: float = 0.0

    @property
    def images(self) -> int:
        return len(self.clean)

    @property
    def clean_top1(self) -> float:
        return 100.0 * self.clean.sum().item() / max(1, self.images)

    @property
    def robust_top1(self) -> float:
        return 100.0 * self.robust.sum().item() / max(1, self.images)

    @property
    def total_seconds(self) -> float:
        return self.clean_seconds + sum(self.seconds.values())


def run_autoattack(
        adversary,
        x: Any,
        y: torch.Tensor,
        batch_size: int = 250,
        progress: Optional[str] = None,
        on_attack: Optional[Callable[[str, float], None]] = None,
) -> AutoAttackResult:
    """AutoAttack ``adversary`` (``autoattack_adversary``, or the package's ``AutoAttack`` configured by hand) on
    images ``x`` (a float tensor in [0, 1], or ``PixelImages``) with labels ``y``, the way the package's
    ``run_standard_evaluation(x, y, batch_size=batch_size)`` runs it (see the module docstring), keeping what
    each attack broke. ``progress``: a tqdm label per attack; ``on_attack(name, robust_top1)`` after each."""
    images = x if isinstance(x, PixelImages) else None
    if images is None:
        def take(idx, device):  # contiguous: the package's APGD views its gradients, which a permuted layout breaks
            return x[idx].contiguous().to(device)
        n = x.shape[0]
    else:
        take, n = images.batch, len(images)
    if n == 0:
        raise ValueError('AutoAttack: no images to attack')
    device = torch.device(adversary.device)
    model = adversary.model
    y = y.to('cpu').long()
    attacks = list(adversary.attacks_to_run)
    clean = torch.zeros(n, dtype=torch.bool)
    start = time.perf_counter()
    with torch.inference_mode():  # the clean pass: no autograd bookkeeping at all
        for lo in range(0, n, batch_size):
            idx = torch.arange(lo, min(lo + batch_size, n))
            pred = model(take(idx, device)).max(dim=1)[1]
            clean[idx] = y[idx].to(device).eq(pred).cpu()
    result = AutoAttackResult(attacks, clean, clean.clone(), clean_seconds=time.perf_counter() - start)
    robust = result.robust
    with torch.no_grad():  # as the package: each attack enables gradients where it needs them
        for name in attacks:
            t0 = time.perf_counter()
            result.broken[name] = []
            left = robust.nonzero().flatten()
            bar = tqdm(total=len(left), desc=f'{progress} {name}', unit='img', leave=False,
                       dynamic_ncols=True) if progress and len(left) else None
            for lo in range(0, len(left), batch_size):
                idx = left[lo:lo + batch_size]
                xb, yb = take(idx, device), y[idx].to(device)
                adv = _perturb(adversary, name, xb, yb)
                wrong = (~yb.eq(model(adv).max(dim=1)[1])).cpu()
                robust[idx[wrong]] = False
                result.broken[name] += idx[wrong].tolist()
                if bar is not None:
                    bar.update(len(idx))
            if bar is not None:
                bar.close()
            result.seconds[name] = time.perf_counter() - t0
            result.after[name] = result.robust_top1
            if on_attack is not None:
                on_attack(name, result.after[name])
    return result


def _perturb(adversary, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One batch of one attack, exactly as the package's ``run_standard_evaluation`` dispatches it."""
    a = adversary
    if name == 'apgd-ce':
        a.apgd.loss = 'ce'
        a.apgd.seed = a.get_seed()
        return a.apgd.perturb(x, y)
    if name == 'apgd-dlr':
        a.apgd.loss = 'dlr'
        a.apgd.seed = a.get_seed()
        return a.apgd.perturb(x, y)
    if name == 'fab':
        a.fab.targeted = False
        a.fab.seed = a.get_seed()
        return a.fab.perturb(x, y)
    if name == 'square':
        a.square.seed = a.get_seed()
        return a.square.perturb(x, y)
    if name == 'apgd-t':
        a.apgd_targeted.seed = a.get_seed()
        return a.apgd_targeted.perturb(x, y)
    if name == 'fab-t':
        a.fab.targeted = True
        a.fab.n_restarts = 1
        a.fab.seed = a.get_seed()
        return a.fab.perturb(x, y)
    raise ValueError(f'unknown AutoAttack attack {name!r}; choose from {", ".join(AUTOATTACK_ATTACKS)}')
