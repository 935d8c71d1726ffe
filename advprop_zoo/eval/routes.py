"""The two faces of a dual-BN (AdvProp-trained, not yet folded) checkpoint: its main BNs (the released
model) and its auxiliary BNs (the ones that normalised adversarial examples in training).

``route_model`` turns a dual-BN model into the plain model that computes one route: the main route is
the fold (``fold_dual_bn``: the aux BNs dropped), the aux route the same fold after each layer's auxiliary
statistics and affine parameters took the main BN's place. Either is then an ordinary timm model, so the
suite fuses it (``fuse_bn``) with that route's BNs: fused and unfused routes compute the same function up
to float rounding, exactly as for a plain checkpoint (checked in ``tests/test_autoattack.py``).
"""
import copy
from typing import List

import torch
from torch import nn

from ..dual_bn import is_dual_bn
from ..fold import fold_dual_bn

__all__ = ['BN_ROUTES', 'route_names', 'route_model', 'check_bn_route', 'ROUTE_PREFIX']

BN_ROUTES = ('main', 'aux', 'both')
ROUTE_PREFIX = {'main': '', 'aux': 'aux_'}  # metric-name prefix of each route's numbers


def check_bn_route(route: str) -> None:
    if route not in BN_ROUTES:
        raise ValueError(f'unknown --bn-route {route!r}; choose one of {", ".join(BN_ROUTES)}')


def route_names(route: str) -> List[str]:
    """``'both'`` -> ``['main', 'aux']``; a single route -> itself."""
    check_bn_route(route)
    return ['main', 'aux'] if route == 'both' else [route]


def route_model(model: nn.Module, route: str) -> nn.Module:
    """A plain (folded) copy of dual-BN ``model`` that computes its ``route`` ('main' or 'aux') in eval mode;
    ``model`` itself is left as it is. A model without dual BNs is returned as a copy for 'main' and refused
    for 'aux' (ValueError: there are no auxiliary BNs to route through)."""
    if route not in ('main', 'aux'):
        raise ValueError(f'route_model: route must be main or aux, got {route!r}')
    duals = [m for m in model.modules() if is_dual_bn(m)]
    if not duals and route == 'aux':
        raise ValueError('--bn-route aux needs a dual-BN model (auxiliary BNs); this one has none')
    plain = copy.deepcopy(model)
    if route == 'aux':
        with torch.no_grad():
            for m in plain.modules():
                if not is_dual_bn(m):
                    continue
                aux = m.aux_bn[0]
                for name in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'):
                    src, dst = getattr(aux, name), getattr(m, name)
                    if src is not None and dst is not None:
                        dst.copy_(src)
                m.eps = aux.eps
    return fold_dual_bn(plain).eval() if duals else plain.eval()
