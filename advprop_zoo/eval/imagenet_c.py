"""ImageNet-C arithmetic: corruption error (CE), mCE and relative mCE, normalised by AlexNet.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019 (arXiv:1903.12261). For a model f, corruption c and severity s with top-1
error E(f, c, s):

    CE(f, c)          = sum_s E(f, c, s)                 / sum_s E(AlexNet, c, s)
    relative CE(f, c) = sum_s (E(f, c, s) - E(f, clean)) / sum_s (E(AlexNet, c, s) - E(AlexNet, clean))

and mCE / relative mCE are the means over the 15 benchmark corruptions (the four 'extra' ones of the
release are reported but, as in the paper, not averaged in). Every severity set of ImageNet-C has the
same 50,000 images, so a sum over severities is five times the mean, and AlexNet's per-corruption
numbers can be kept as means over the five severities. Numbers here are in percent (AlexNet = 100).
"""
import math
from typing import Dict, Mapping, Optional, Sequence

__all__ = [
    'BENCHMARK_CORRUPTIONS', 'EXTRA_CORRUPTIONS', 'SEVERITIES', 'ALEXNET_ERRORS', 'ALEXNET_CLEAN_ERROR', 'imagenet_c_summary',
]

# the 15 benchmark corruptions, in the paper's order (noise, blur, weather, digital)
BENCHMARK_CORRUPTIONS = (
    'gaussian_noise', 'shot_noise', 'impulse_noise',
    'defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur',
    'snow', 'frost', 'fog', 'brightness',
    'contrast', 'elastic_transform', 'pixelate', 'jpeg_compression',
)
# released as held-out "extra" corruptions: evaluated when present, never part of mCE
EXTRA_CORRUPTIONS = ('speckle_noise', 'gaussian_blur', 'spatter', 'saturate')
SEVERITIES = (1, 2, 3, 4, 5)

# AlexNet's top-1 error on each corruption, averaged over the five severities (fractions).
# Source: Hendrycks & Dietterich's evaluation of torchvision's AlexNet (github.com/hendrycks/robustness);
# these 6-decimal values are the ones AugMix (google-research/augmix, "raw AlexNet errors taken from
# hendrycks/robustness") and mmpretrain use; google/robustness_metrics has them to 3 decimals, citing
# Appendix C of the arXiv version of the paper.
ALEXNET_ERRORS: Dict[str, float] = {
    'gaussian_noise': 0.886428, 'shot_noise': 0.894468, 'impulse_noise': 0.922640,
    'defocus_blur': 0.819880, 'glass_blur': 0.826268, 'motion_blur': 0.785948, 'zoom_blur': 0.798360,
    'snow': 0.866816, 'frost': 0.826572, 'fog': 0.819324, 'brightness': 0.564592,
    'contrast': 0.853204, 'elastic_transform': 0.646056, 'pixelate': 0.717840, 'jpeg_compression': 0.606500,
}
# AlexNet's clean ImageNet-val top-1 error, for relative mCE: 43.5 % in the paper's table;
# 0.4348 as used by google/robustness_metrics (torchvision's AlexNet, 56.52 % top-1).
ALEXNET_CLEAN_ERROR = 0.4348


def imagenet_c_summary(
        errors: Mapping[str, Mapping[int, float]],
        clean_error: Optional[float] = None,
) -> Dict[str, object]:
    """CE per corruption, mCE and (with the model's clean error) relative mCE from top-1 errors in percent.

    ``errors`` maps a corruption name to ``{severity: error %}`` with all five severities. mCE and
    relative mCE are given only when all 15 benchmark corruptions are present (else None); extra
    corruptions get their mean error but no CE (AlexNet has no published number for them).
    Returns ``{'corruptions': {name: {'errors', 'error', 'ce', 'relative_ce'}}, 'mce', 'relative_mce',
    'clean_error', 'alexnet_clean_error'}``, all in percent.
    """
    out: Dict[str, Dict[str, object]] = {}
    for name, by_sev in errors.items():
        sev = {int(s): float(e) for s, e in by_sev.items()}
        missing = [s for s in SEVERITIES if s not in sev]
        if missing:
            raise ValueError(f'imagenet-c: {name} has no error for severity {", ".join(map(str, missing))}')
        bad = [e for e in sev.values() if not 0.0 <= e <= 100.0]
        if bad:
            raise ValueError(f'imagenet-c: {name} error {bad[0]} is not a percentage in [0, 100]')
        mean = sum(sev[s] for s in SEVERITIES) / len(SEVERITIES)
        row: Dict[str, object] = {'errors': {str(s): sev[s] for s in SEVERITIES}, 'error': mean,
                                  'ce': None, 'relative_ce': None}
        alex = ALEXNET_ERRORS.get(name)
        if alex is not None:
            row['ce'] = 100.0 * mean / (100.0 * alex)
            if clean_error is not None:
                row['relative_ce'] = 100.0 * (mean - clean_error) / (100.0 * (alex - ALEXNET_CLEAN_ERROR))
        elif name not in EXTRA_CORRUPTIONS:
            raise ValueError(f'imagenet-c: unknown corruption {name!r}; the benchmark has {", ".join(BENCHMARK_CORRUPTIONS)} '
                             f'(and extras {", ".join(EXTRA_CORRUPTIONS)})')
        out[name] = row
    complete = all(c in out for c in BENCHMARK_CORRUPTIONS)
    return {
        'corruptions': {c: out[c] for c in _ordered(out)},
        'mce': _mean([out[c]['ce'] for c in BENCHMARK_CORRUPTIONS]) if complete else None,
        'relative_mce': (_mean([out[c]['relative_ce'] for c in BENCHMARK_CORRUPTIONS])
                         if complete and clean_error is not None else None),
        'clean_error': clean_error,
        'alexnet_clean_error': 100.0 * ALEXNET_CLEAN_ERROR,
    }


def _ordered(names: Sequence[str]) -> list:
    known = [c for c in BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS if c in names]
    return known + sorted(n for n in names if n not in known)


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)
