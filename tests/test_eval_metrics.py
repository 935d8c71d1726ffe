"""Evaluation arithmetic and label spaces, without running a model: mCE / relative mCE, the AlexNet
constants, the ImageNet-A mask, eps parsing, the results JSON and --compare."""
import json

import pytest
import torch
from torch import nn

from advprop_zoo.eval.datasets import LogitSubset, imagenet_a_indices, imagenet_a_synsets, imagenet_synsets
from advprop_zoo.eval.results import SCHEMA, compare_results, metrics_of, read_results, write_results
from advprop_zoo.eval.suite import parse_eps
from advprop_zoo.eval.imagenet_c import (
    ALEXNET_CLEAN_ERROR, ALEXNET_ERRORS, BENCHMARK_CORRUPTIONS, EXTRA_CORRUPTIONS, imagenet_c_summary,
)


def _uniform(mean_of):
    """Severity errors 0.5x ... 1.5x of a target mean (so their mean is exactly the target)."""
    return {c: {s: m * f for s, f in zip(range(1, 6), (0.5, 0.75, 1.0, 1.25, 1.5))} for c, m in mean_of.items()}


def test_alexnet_constants_are_the_published_ones():
    assert BENCHMARK_CORRUPTIONS[0] == 'gaussian_noise' and BENCHMARK_CORRUPTIONS[-1] == 'jpeg_compression' and len(BENCHMARK_CORRUPTIONS) == 15
    assert set(ALEXNET_ERRORS) == set(BENCHMARK_CORRUPTIONS) and not set(EXTRA_CORRUPTIONS) & set(BENCHMARK_CORRUPTIONS)
    # Hendrycks & Dietterich 2019, AlexNet top-1 errors averaged over severities (a few spot values)
    assert ALEXNET_ERRORS['gaussian_noise'] == 0.886428
    assert ALEXNET_ERRORS['brightness'] == 0.564592
    assert ALEXNET_ERRORS['jpeg_compression'] == 0.606500
    assert round(100 * ALEXNET_CLEAN_ERROR, 1) == 43.5  # the paper's table: AlexNet clean error 43.5


def test_ce_and_relative_ce_by_hand():
    errors = {'gaussian_noise': {1: 10, 2: 20, 3: 30, 4: 40, 5: 50}, 'brightness': {1: 30, 2: 30, 3: 30, 4: 30, 5: 30}}
    out = imagenet_c_summary(errors, clean_error=20.0)
    g, b = out['corruptions']['gaussian_noise'], out['corruptions']['brightness']
    assert g['error'] == pytest.approx(30.0) and b['error'] == pytest.approx(30.0)
    # CE = 30 / 88.6428 * 100 = 33.8437;  30 / 56.4592 * 100 = 53.1357
    assert g['ce'] == pytest.approx(33.84370, abs=1e-4)
    assert b['ce'] == pytest.approx(53.13572, abs=1e-4)
    # relative CE = (30 - 20) / (88.6428 - 43.48) * 100 = 22.1421;  (30 - 20) / (56.4592 - 43.48) * 100 = 77.0464
    assert g['relative_ce'] == pytest.approx(22.14212, abs=1e-4)
    assert b['relative_ce'] == pytest.approx(77.04635, abs=1e-4)
    assert out['mce'] is None and out['relative_mce'] is None  # 2 of 15 corruptions: no mCE


def test_mce_of_a_model_half_as_wrong_as_alexnet_is_50():
    # every corruption at half AlexNet's error, clean error half AlexNet's: CE = relative CE = 50 for each
    half = _uniform({c: 50 * e for c, e in ALEXNET_ERRORS.items()})
    out = imagenet_c_summary(half, clean_error=50 * ALEXNET_CLEAN_ERROR)
    assert out['mce'] == pytest.approx(50.0) and out['relative_mce'] == pytest.approx(50.0)
    assert list(out['corruptions']) == list(BENCHMARK_CORRUPTIONS)  # the paper's order


def test_mce_is_the_mean_over_the_15_and_ignores_extras():
    means = {c: 20.0 + i for i, c in enumerate(BENCHMARK_CORRUPTIONS)}
    errors = _uniform(means)
    errors['spatter'] = {s: 99.0 for s in range(1, 6)}
    out = imagenet_c_summary(errors)
    expected = sum(100 * means[c] / (100 * ALEXNET_ERRORS[c]) for c in BENCHMARK_CORRUPTIONS) / 15
    assert out['mce'] == pytest.approx(expected, rel=1e-12)
    assert out['corruptions']['spatter']['ce'] is None and out['corruptions']['spatter']['error'] == 99.0
    assert out['relative_mce'] is None  # no clean error given


def test_summary_refuses_missing_severity_and_unknown_corruption():
    with pytest.raises(ValueError, match='severity 4'):
        imagenet_c_summary({'fog': {1: 1, 2: 2, 3: 3, 5: 5}})
    with pytest.raises(ValueError, match='unknown corruption'):
        imagenet_c_summary({'rain': {s: 1 for s in range(1, 6)}})


def test_imagenet_a_mask_maps_200_wnids_in_order():
    idx, wnids, in1k = imagenet_a_indices(), imagenet_a_synsets(), imagenet_synsets()
    assert len(idx) == len(set(idx)) == 200 and len(in1k) == 1000
    assert idx == sorted(idx) and wnids == sorted(wnids)  # both sorted by wnid: folder order = label order
    # independent facts: ImageNet-1k class index of some ImageNet-A classes
    known = {'n01498041': 6,    # stingray (ImageNet-A's first class)
             'n01531178': 11,   # goldfinch
             'n01534433': 13,   # junco
             'n02099601': 207,  # golden retriever
             'n02110958': 254,  # pug
             'n12267677': 988}  # acorn (ImageNet-A's last class)
    for wnid, index in known.items():
        assert idx[wnids.index(wnid)] == index and in1k[index] == wnid
    assert wnids[0] == 'n01498041' and wnids[-1] == 'n12267677'
    assert idx[:10] == [6, 11, 13, 15, 17, 22, 23, 27, 30, 37] and idx[-4:] == [984, 986, 987, 988]
    assert in1k[0] == 'n01440764' and 'n01440764' not in wnids  # tench is not an ImageNet-A class


def test_logit_subset_picks_columns_in_order():
    head = LogitSubset(nn.Identity(), imagenet_a_indices())
    logits = torch.arange(1000.).expand(2, 1000)
    out = head(logits)
    assert out.shape == (2, 200) and out[0, 0] == 6 and out[0, -1] == 988
    assert torch.equal(out[1], torch.tensor(imagenet_a_indices(), dtype=torch.float))


@pytest.mark.parametrize('text,expected', [('1,2,4', [1.0, 2.0, 4.0]), ('0.5', [0.5]), (' 1 , 8 ', [1.0, 8.0])])
def test_parse_eps(text, expected):
    assert parse_eps(text) == expected


@pytest.mark.parametrize('text', ['1,x', '-1', '1,,2', '300', 'nan', '', '2,2'])
def test_parse_eps_refuses(text):
    with pytest.raises(ValueError, match='bad --eps'):
        parse_eps(text)


def _report(model, dataset='imagenet', top1=70.0, mce=None):
    report = {'schema': SCHEMA, 'model': model, 'dataset': dataset, 'num_classes': 1000,
              'weights': {'source': 'checkpoint', 'location': 'w.safetensors', 'sha256': 'ab' * 32},
              'data_dir': '/data', 'data_config': {'input_size': [3, 224, 224], 'interpolation': 'bicubic',
                                                   'crop_pct': 0.875},
              'results': {'clean': {'top1': top1, 'top5': 90.0, 'images': 10, 'images_per_s': 1.0},
                          'robust': [{'name': 'pgd5_eps4', 'kind': 'pgd', 'eps': 4.0, 'steps': 5, 'top1': 10.0,
                                      'top5': 20.0, 'images': 10, 'images_per_s': 1.0}]}}
    if mce is not None:
        report['results']['imagenet_c'] = {'corruptions': {}, 'mce': mce, 'relative_mce': None}
    report['metrics'] = metrics_of(report)
    return report


def test_metric_names():
    m = _report('a', mce=60.0)['metrics']
    assert m == {'imagenet_top1': 70.0, 'imagenet_top5': 90.0, 'imagenet_pgd5_eps4_top1': 10.0,
                 'imagenet_pgd5_eps4_top5': 20.0, 'imagenet_c_mce': 60.0}


def test_compare_prints_deltas_against_the_first():
    text = compare_results([_report('vanilla', top1=70.0, mce=70.7), _report('advprop', top1=72.5, mce=66.2)],
                           ['vanilla', 'advprop'])
    rows = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2:-1]]
            for line in text.splitlines() if line.startswith('| imagenet')}
    assert rows['imagenet_top1'] == ['70.00', '72.50', '+2.50']
    assert rows['imagenet_c_mce (↓)'] == ['70.70', '66.20', '-4.50']
    with pytest.raises(ValueError, match='two'):
        compare_results([_report('a')])


def test_results_json_round_trip_and_refusals(tmp_path):
    path = write_results(_report('a'), tmp_path / 'r.json')
    assert read_results(path)['metrics']['imagenet_top1'] == 70.0
    assert not list(tmp_path.glob('.*.tmp'))  # atomic: no temp file left
    (tmp_path / 'other.json').write_text(json.dumps({'top1': 1}))
    with pytest.raises(ValueError, match='not an advprop-zoo eval results file'):
        read_results(tmp_path / 'other.json')
    (tmp_path / 'bad.json').write_text('{')
    with pytest.raises(ValueError, match='not a JSON file'):
        read_results(tmp_path / 'bad.json')
    nan = _report('a')
    nan['metrics']['imagenet_top1'] = float('nan')
    with pytest.raises(ValueError):
        write_results(nan, tmp_path / 'nan.json')
    assert not (tmp_path / 'nan.json').exists()


def test_imagenet_synsets_are_timms_imagenet_info_list():
    from timm.data import ImageNetInfo
    assert imagenet_synsets() == list(ImageNetInfo('imagenet-1k').label_names())
