"""advprop-zoo eval end to end on tiny synthetic trees in each released layout.

Images are placed in class folders by the prediction of a reference pipeline written here (timm's
own resolve_data_config + create_transform on PIL images, the unfused model), some deliberately in a
wrong folder, so every accuracy and ImageNet-C error has a known value: a wrong label mapping, a wrong
preprocessing or a wrong ImageNet-A mask shows up as a wrong number.
"""
import copy
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from advprop_zoo.attacks import AttackConfig, attack
from advprop_zoo.cli import main
from advprop_zoo.eval.datasets import (
    class_map_for, create_eval_loader, imagenet_a_indices, imagenet_a_synsets, imagenet_synsets,
)
from advprop_zoo.eval.results import read_results
from advprop_zoo.eval.suite import EvalConfig, eval_data_config, prepare_eval_model, run_eval
from advprop_zoo.eval.imagenet_c import BENCHMARK_CORRUPTIONS, imagenet_c_summary

SIZE = 32  # eval resolution: tiny, through the model's own transform (resize, bicubic, crop_pct)
WNIDS = imagenet_synsets()


def _toy_model(num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """test_efficientnet with non-trivial BN statistics and a confident head (its predictions depend on the input)."""
    torch.manual_seed(seed)
    model = timm.create_model('test_efficientnet', num_classes=num_classes).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.05)
                m.running_var.uniform_(0.7, 1.4)
                m.weight.uniform_(0.8, 1.2)
                m.bias.normal_(0, 0.05)
        model.classifier.weight.mul_(1000)
    return model


def _stage(folder: Path, model: nn.Module, n: int, seed: int):
    """``n`` JPEGs and the reference logits of each: timm's eval transform from the model's config."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    cfg = timm.data.resolve_data_config({'img_size': SIZE}, model=model)
    transform = timm.data.create_transform(**cfg)
    paths = []
    for i in range(n):
        h, w = rng.integers(36, 56, size=2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f'{i}.JPEG', quality=95)
        paths.append(folder / f'{i}.JPEG')
    with torch.no_grad():
        logits = model(torch.stack([transform(Image.open(p).convert('RGB')) for p in paths]))
    top2 = logits.topk(2).values
    keep = (top2[:, 0] - top2[:, 1]) > 1e-2  # clear winners only: float rounding cannot flip them
    return [(p, lg) for p, lg, k in zip(paths, logits, keep) if k]


def _place(root: Path, items) -> Path:
    """Copy staged images into ``root/<folder>/``; ``items`` is [(path, folder name)]."""
    for i, (src, name) in enumerate(items):
        (root / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / name / f'img{i}.JPEG')
    return root


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('eval')
    model = _toy_model()
    save_file(model.state_dict(), str(tmp / 'toy.safetensors'))
    pool = _stage(tmp / 'stage', model, 24, seed=0)
    assert len(pool) >= 10
    head3 = _toy_model(num_classes=3, seed=1)
    save_file(head3.state_dict(), str(tmp / 'toy3.safetensors'))
    pool3 = _stage(tmp / 'stage3', head3, 12, seed=1)
    return SimpleNamespace(tmp=tmp, model=model, ckpt=tmp / 'toy.safetensors', pool=pool,
                           ckpt3=tmp / 'toy3.safetensors', pool3=pool3)


def _pred(logits, rank=0):
    return WNIDS[logits.argsort(descending=True)[rank].item()]


def _cfg(toy, data_dir, **kw):
    kw.setdefault('checkpoint', str(toy.ckpt))
    kw.setdefault('batch_size', 4)
    return EvalConfig(model='test_efficientnet', data_dir=str(data_dir), img_size=SIZE, workers=0, progress=False, **kw)


@pytest.fixture(scope='module')
def imagenet_tree(toy):
    (p0, l0), (p1, l1), (p2, l2), (p3, l3), (p4, l4), (p5, l5) = toy.pool[:6]
    outside_top5 = WNIDS[l5.argsort(descending=True)[10].item()]
    # 4 right, 1 wrong but in the top-5 (2nd choice), 1 wrong outside the top-5: top-1 4/6, top-5 5/6
    return _place(toy.tmp / 'imagenet' / 'val', [(p0, _pred(l0)), (p1, _pred(l1)), (p2, _pred(l2)), (p3, _pred(l3)),
                                                  (p4, _pred(l4, 1)), (p5, outside_top5)]).parent


def test_imagenet_top1_top5_with_wnid_labels(toy, imagenet_tree):
    report = run_eval(_cfg(toy, imagenet_tree))  # a root holding val/ is searched like timm does
    assert report['data_dir'].endswith('val')
    assert report['metrics']['imagenet_top1'] == pytest.approx(100 * 4 / 6)
    assert report['metrics']['imagenet_top5'] == pytest.approx(100 * 5 / 6)
    assert report['results']['clean']['images'] == 6 and report['results']['clean']['images_per_s'] > 0
    assert report['data_config']['input_size'] == [3, SIZE, SIZE]
    assert report['data_config']['interpolation'] == 'bicubic' and report['data_config']['crop_pct'] == 0.95
    assert report['weights']['source'] == 'checkpoint' and len(report['weights']['sha256']) == 64


def test_fused_channels_last_and_unfused_give_the_same_numbers(toy, imagenet_tree):
    fused = run_eval(_cfg(toy, imagenet_tree, channels_last=True))
    plain = run_eval(_cfg(toy, imagenet_tree, fuse=False))
    bf16 = run_eval(_cfg(toy, imagenet_tree, amp='bf16'))  # AMP runs; bf16 may round a top-5 either way
    assert fused['metrics'] == plain['metrics'] and fused['settings']['fused'] and not plain['settings']['fused']
    assert 0 <= bf16['metrics']['imagenet_top1'] <= 100


def test_fused_zoo_model_computes_the_same_function():
    """efficientnet_b0_advprop (TF 'same' padding, BN eps 1e-3) fused with static padding for the eval size:
    logits agree with the model as built, in channels_last too."""
    torch.manual_seed(0)
    model = timm.create_model('efficientnet_b0_advprop').eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        model.classifier.weight.mul_(1000)
    cfg = eval_data_config(model, 64)
    assert cfg['mean'] == (0.5, 0.5, 0.5) and cfg['std'] == (0.5, 0.5, 0.5) and cfg['interpolation'] == 'bicubic'
    fused = prepare_eval_model(copy.deepcopy(model), cfg['input_size'], torch.device('cpu'), channels_last=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ref, out = model(x), fused(x.contiguous(memory_format=torch.channels_last))
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_robust_eval_agrees_with_the_attack_module(toy, imagenet_tree):
    report = run_eval(_cfg(toy, imagenet_tree, attack='pgd', eps=[2.0, 4.0], batch_size=64, fuse=False))
    report_fgsm = run_eval(_cfg(toy, imagenet_tree, attack='fgsm', eps=[8.0], batch_size=64, fuse=False))
    model = toy.model
    root = imagenet_tree / 'val'
    cfg = eval_data_config(model, SIZE)
    x, y = next(iter(create_eval_loader(root, class_map_for('imagenet', root, 1000), cfg, 64, torch.device('cpu'), 0)))
    for rep, kind in ((report, 'pgd'), (report_fgsm, 'fgsm')):
        for r in rep['results']['robust']:
            gen = torch.Generator().manual_seed(0)
            x_adv = attack(model, x, y, AttackConfig(kind=kind, eps=r['eps'], targeted=False), cfg['mean'], cfg['std'],
                           mode='eval', generator=gen)
            with torch.no_grad():
                top1 = 100 * (model(x_adv).argmax(-1) == y).float().mean().item()
            assert r['top1'] == pytest.approx(top1)
            assert rep['metrics'][f'imagenet_{r["name"]}_top1'] == r['top1']
    names = [r['name'] for r in report['results']['robust']]
    assert names == ['pgd3_eps2', 'pgd5_eps4']  # the paper's rule: eps + 1 steps
    assert report['results']['robust'][-1]['top1'] < report['metrics']['imagenet_top1']  # the attack bites


def test_imagenet_a_masks_logits_to_its_200_classes(toy):
    a_wnids, a_idx = imagenet_a_synsets(), imagenet_a_indices()
    items, differs = [], 0
    for path, logits in toy.pool[:4]:
        masked = logits[a_idx]
        order = masked.argsort(descending=True)
        items.append((path, a_wnids[order[0]]))
        differs += _pred(logits) != a_wnids[order[0]]
    path, logits = toy.pool[4]
    items.append((path, a_wnids[logits[a_idx].argsort(descending=True)[1]]))  # its 2nd choice among the 200
    root = _place(toy.tmp / 'imagenet-a', items)
    report = run_eval(_cfg(toy, root, dataset='imagenet-a'))
    assert differs > 0  # the 1000-way argmax would mostly be wrong: the mask matters
    assert report['metrics']['imagenet_a_top1'] == pytest.approx(80.0)
    assert report['metrics']['imagenet_a_top5'] == pytest.approx(100.0)


def test_stylized_is_a_1000_class_folder(toy):
    (p0, l0), (p1, l1) = toy.pool[6:8]
    root = _place(toy.tmp / 'stylized', [(p0, _pred(l0)), (p1, _pred(l1, 3))])
    assert run_eval(_cfg(toy, root, dataset='stylized'))['metrics']['stylized_top1'] == pytest.approx(50.0)


def test_folder_uses_the_checkpoint_head_size(toy):
    names = ['b_dog', 'a_cat', 'c_emu']  # labels follow sorted folder names: a_cat 0, b_dog 1, c_emu 2
    ordered = sorted(names)
    items = [(p, ordered[lg.argmax().item()]) for p, lg in toy.pool3[:3]]
    p, lg = toy.pool3[3]
    items.append((p, ordered[(lg.argmax().item() + 1) % 3]))
    root = _place(toy.tmp / 'folder', items)
    for name in names:
        (root / name).mkdir(exist_ok=True)  # a class without images still counts as a class
    report = run_eval(_cfg(toy, root, dataset='folder', checkpoint=str(toy.ckpt3)))
    assert report['num_classes'] == 3 and report['metrics']['folder_top1'] == pytest.approx(75.0)


def test_imagenet_c_errors_ce_and_mce_from_a_fixed_confusion(toy, tmp_path):
    """15 corruptions x 5 severities, 2 images each, 0, 1 or 2 of them in the right folder; noise
    corruptions under their category folder (as in the release tarballs), the rest at the top."""
    pool = toy.pool[:2]
    root = tmp_path / 'imagenet-c'
    expected = {}
    for ci, c in enumerate(BENCHMARK_CORRUPTIONS):
        expected[c] = {}
        base = root / 'noise' / c if c.endswith('_noise') else root / c
        for s in range(1, 6):
            right = (ci + s) % 3  # 0, 1 or 2 right
            items = [(p, _pred(lg) if k < right else _pred(lg, 7)) for k, (p, lg) in enumerate(pool)]
            _place(base / str(s), items)
            expected[c][s] = 100.0 * (2 - right) / 2
    (p3, l3) = toy.pool[3]
    clean = _place(tmp_path / 'clean', [(p, _pred(lg)) for p, lg in toy.pool[:3]] + [(p3, _pred(l3, 1))])  # 3 of 4
    report = run_eval(_cfg(toy, root, dataset='imagenet-c', clean_dir=str(clean)))
    c = report['results']['imagenet_c']
    for name in BENCHMARK_CORRUPTIONS:
        assert c['corruptions'][name]['errors'] == {str(s): expected[name][s] for s in range(1, 6)}
    want = imagenet_c_summary(expected, clean_error=25.0)
    assert report['metrics']['imagenet_top1'] == pytest.approx(75.0) and c['clean_error'] == pytest.approx(25.0)
    assert c['mce'] == pytest.approx(want['mce']) and c['relative_mce'] == pytest.approx(want['relative_mce'])
    # by hand for one corruption: gaussian_noise (index 0) severities 1..5 -> right 1,2,0,1,2 -> errors 50,0,100,50,0
    assert c['corruptions']['gaussian_noise']['ce'] == pytest.approx(40.0 / 0.886428)
    assert report['metrics']['imagenet_c_mce'] == c['mce'] and c['images'] == 150
    from advprop_zoo.eval.results import plot_results
    assert plot_results(report, tmp_path / 'ce.png').read_bytes()[:4] == b'\x89PNG'


def test_cli_eval_writes_json_table_plot_and_compares(toy, imagenet_tree, tmp_path, capsys):
    out_a, out_b, plot = tmp_path / 'vanilla.json', tmp_path / 'advprop.json', tmp_path / 'eps.png'
    base = ['eval', '--model', 'test_efficientnet', '--checkpoint', str(toy.ckpt), '--data-dir', str(imagenet_tree),
            '--img-size', str(SIZE), '--workers', '0', '--no-progress']
    assert main(base + ['--output', str(out_a)]) == 0
    assert main(base + ['--attack', 'fgsm', '--eps', '1,4', '--output', str(out_b), '--plot', str(plot)]) == 0
    text = capsys.readouterr().out
    assert '| imagenet |      6 |' in text and '| fgsm_eps4 |' in text
    assert plot.read_bytes()[:4] == b'\x89PNG'
    report = read_results(out_b)
    assert report['metrics']['imagenet_top1'] == pytest.approx(100 * 4 / 6)
    assert report['settings']['attack']['kind'] == 'fgsm'
    assert main(['eval', '--compare', str(out_a), str(out_b)]) == 0
    text = capsys.readouterr().out
    assert 'imagenet_fgsm_eps4_top1' in text and '| vanilla | advprop |' in text
    row = next(line for line in text.splitlines() if line.startswith('| imagenet_top1 '))
    assert row.rstrip(' |').endswith('+0.00')


def test_pretrained_weights_from_the_hub_cache_are_hashed(toy, imagenet_tree, hub_cache):
    import hashlib
    data = toy.ckpt.read_bytes()
    hub_cache('timm/test_efficientnet.r160_in1k', 'model.safetensors', data)
    report = run_eval(_cfg(toy, imagenet_tree, checkpoint=None, pretrained=True))
    assert report['weights'] == {'source': 'pretrained', 'location': 'hf-hub:timm/test_efficientnet.r160_in1k',
                                 'sha256': hashlib.sha256(data).hexdigest()}
    assert report['metrics']['imagenet_top1'] == pytest.approx(100 * 4 / 6)  # the same weights as the checkpoint


def test_pretrained_missing_offline_is_one_line(imagenet_tree, hub_cache, capsys):
    err = _error(capsys, ['eval', '--model', 'test_efficientnet', '--pretrained', '--data-dir', str(imagenet_tree),
                          '--no-progress'])
    assert 'not in the Hugging Face cache' in err and 'HF_HUB_OFFLINE' in err


def test_missing_matplotlib_is_one_line(toy, imagenet_tree, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__('sys').modules, 'matplotlib', None)  # import matplotlib -> ImportError
    err = _error(capsys, _args(toy, imagenet_tree, '--attack', 'pgd', '--plot', str(tmp_path / 'p.png')))
    assert '--plot needs matplotlib' in err and 'pip install matplotlib' in err


def _error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith('advprop-zoo eval: error: '), err
    return err


def _args(toy, data_dir, *extra, ckpt=None):
    return ['eval', '--model', 'test_efficientnet', '--checkpoint', str(ckpt or toy.ckpt), '--data-dir', str(data_dir),
            '--img-size', str(SIZE), '--workers', '0', '--no-progress', *extra]


def test_bad_inputs_give_one_clear_line(toy, imagenet_tree, tmp_path, capsys):
    assert 'does not exist' in _error(capsys, _args(toy, tmp_path / 'nope'))
    (tmp_path / 'bare').mkdir()
    assert 'has no class folders' in _error(capsys, _args(toy, tmp_path / 'bare'))
    (tmp_path / 'empty' / WNIDS[0]).mkdir(parents=True)
    assert 'no images in' in _error(capsys, _args(toy, tmp_path / 'empty'))
    bad = _place(tmp_path / 'unknown', [(toy.pool[0][0], WNIDS[0]), (toy.pool[1][0], 'n99999999')])
    err = _error(capsys, _args(toy, bad))
    assert "folder 'n99999999'" in err and 'is not an ImageNet-1k class' in err
    not_a = _place(tmp_path / 'not-a', [(toy.pool[0][0], 'n01440764')])  # tench: ImageNet, not ImageNet-A
    assert "not ImageNet-A's 200 classes" in _error(capsys, _args(toy, not_a, '--dataset', 'imagenet-a'))
    # model / num-classes mismatch, both ways
    assert 'has 1 class folders but the model has 1000' in _error(capsys, _args(toy, not_a, '--dataset', 'folder'))
    assert 'needs a 1000-class ImageNet model' in _error(capsys, _args(toy, imagenet_tree, ckpt=toy.ckpt3))
    for eps in ('1,x', '-2', '1,,4'):
        assert 'bad --eps' in _error(capsys, _args(toy, imagenet_tree, '--attack', 'pgd', '--eps', eps))
    no_weights = ['eval', '--model', 'test_efficientnet', '--data-dir', str(imagenet_tree)]
    assert 'no weights to evaluate' in _error(capsys, no_weights)
    assert '--plot needs --attack' in _error(capsys, _args(toy, imagenet_tree, '--plot', str(tmp_path / 'p.png')))
    assert '--eps' in _error(capsys, _args(toy, imagenet_tree, '--eps', '1,2'))  # an eps without an attack
    assert 'does not exist' in _error(capsys, _args(toy, imagenet_tree, '--output', str(tmp_path / 'no' / 'r.json')))
    assert "unknown model 'efficientnet_b0_advpro'" in _error(
        capsys, ['eval', '--model', 'efficientnet_b0_advpro', '--pretrained', '--data-dir', str(imagenet_tree)])


def test_imagenet_c_layout_errors(toy, tmp_path, capsys):
    root = tmp_path / 'c'
    for c in BENCHMARK_CORRUPTIONS:
        for s in (1, 2, 3, 5) if c == 'fog' else (1, 2, 3, 4, 5):
            _place(root / c / str(s), [(toy.pool[0][0], WNIDS[0])])
    err = _error(capsys, _args(toy, root, '--dataset', 'imagenet-c'))
    assert 'fog lacks severity 4 (found 1, 2, 3, 5' in err
    shutil.rmtree(root / 'fog')
    assert 'has no fog/ folder' in _error(capsys, _args(toy, root, '--dataset', 'imagenet-c'))
    # a named subset works without the missing corruption, and reports no mCE
    report = run_eval(_cfg(toy, root, dataset='imagenet-c', corruptions=['snow', 'frost']))
    assert list(report['results']['imagenet_c']['corruptions']) == ['snow', 'frost']
    assert report['results']['imagenet_c']['mce'] is None and 'imagenet_c_mce' not in report['metrics']
    assert '--attack is not combined' in _error(capsys, _args(toy, root, '--dataset', 'imagenet-c', '--attack', 'pgd'))


def test_output_that_is_a_folder_is_one_line(toy, imagenet_tree, tmp_path, capsys):
    (tmp_path / 'r.json').mkdir()
    err = _error(capsys, _args(toy, imagenet_tree, '--output', str(tmp_path / 'r.json')))
    assert str(tmp_path / 'r.json') in err and 'is a folder' in err
