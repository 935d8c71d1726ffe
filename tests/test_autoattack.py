"""AutoAttack, RobustBench's protocol and the auxiliary-BN route of ``advprop-zoo eval``.

Tiny models (timm's test_efficientnet) and images made here. AutoAttack runs with few iterations where the
package lets us set them on the adversary; the same settings go to the package's own call, whose result ours
must equal image by image.
"""
import copy
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from advprop_zoo.cli import main
from advprop_zoo.dual_bn import bn_route, is_dual_bn, to_dual_bn
from advprop_zoo.eval import robustbench
from advprop_zoo.eval.autoattack import (
    PixelImages, PixelSpaceModel, autoattack_adversary, run_autoattack,
)
from advprop_zoo.eval.datasets import EvalDataError, imagenet_synsets
from advprop_zoo.eval.results import (
    describe_metric, format_results, read_results, results_csv_row,
)
from advprop_zoo.eval.routes import route_model
from advprop_zoo.eval.suite import EvalConfig, eval_data_config, prepare_eval_model, run_eval

SIZE = 32
WNIDS = imagenet_synsets()
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _model(seed=0, num_classes=1000):
    torch.manual_seed(seed)
    model = timm.create_model('test_efficientnet', num_classes=num_classes).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.05)
                m.running_var.uniform_(0.7, 1.4)
        model.classifier.weight.mul_(20)
    return model


def _shorten(adversary, n_iter=8, fab_iter=3, queries=30):
    """Fewer iterations for every attack of the ensemble (set the same way on both sides of a comparison)."""
    for apgd in (adversary.apgd, adversary.apgd_targeted):
        apgd.n_iter = apgd.n_iter_orig = n_iter
        apgd.n_iter_2, apgd.n_iter_min, apgd.size_decr = max(int(0.22 * n_iter), 1), 1, 1
    adversary.fab.n_iter = fab_iter
    adversary.square.n_queries = queries
    return adversary


def _images(n, seed=0, size=SIZE):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255)


def test_run_autoattack_equals_the_packages_own_call():
    """The whole standard ensemble (shortened): robust accuracy and every image's outcome as the package's
    run_standard_evaluation; what each attack broke adds up to the clean-correct images that fell."""
    model = _model()
    x = _images(10)
    wrapped = PixelSpaceModel(model, MEAN, STD)
    with torch.no_grad():
        logits = wrapped(x)
    y = logits.argmax(-1)
    y[:2] = (y[:2] + 1) % 1000  # two clean mistakes: never attacked, never robust
    eps = 2.0
    theirs = _shorten(autoattack_adversary(PixelSpaceModel(copy.deepcopy(model), MEAN, STD), eps, seed=0))
    _, y_adv = theirs.run_standard_evaluation(x.clone(), y.clone(), batch_size=4)
    ours = _shorten(autoattack_adversary(wrapped, eps, seed=0))
    res = run_autoattack(ours, x, y, batch_size=4)
    assert torch.equal(res.robust, y_adv == y)
    assert res.robust_top1 == pytest.approx(100 * (y_adv == y).float().mean().item())
    assert res.attacks == ['apgd-ce', 'apgd-t', 'fab-t', 'square']
    fell = set((res.clean & ~res.robust).nonzero().flatten().tolist())
    broken = [i for a in res.attacks for i in res.broken[a]]
    assert sorted(broken) == sorted(fell) and len(broken) == len(set(broken))
    assert res.clean[:2].tolist() == [False, False] and res.clean_top1 == pytest.approx(80.0)
    assert len(res.broken['apgd-ce']) and len(res.broken['apgd-t']) and 0 < res.robust_top1 < res.clean_top1
    # uint8-held images (what eval keeps in memory) attack the same
    held = PixelImages()
    held.add(x)
    res8 = run_autoattack(_shorten(autoattack_adversary(PixelSpaceModel(model, MEAN, STD), eps, seed=0)),
                          held.done(), y, batch_size=4)
    assert held.data.dtype == torch.uint8 and torch.equal(res8.robust, res.robust)


# ----------------------------------------------------------------------------------------------------------
# advprop-zoo eval end to end

def _stage(folder: Path, model, n, seed):
    """``n`` JPEGs and the model's prediction on each through timm's eval transform at SIZE."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    cfg = timm.data.resolve_data_config({'img_size': SIZE}, model=model)
    transform = timm.data.create_transform(**cfg)
    out = []
    for i in range(n):
        h, w = rng.integers(36, 48, size=2)
        p = folder / f'{i}.JPEG'
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p, quality=95)
        with torch.no_grad():
            out.append((p, model(transform(Image.open(p).convert('RGB'))[None])[0].argmax().item()))
    return out


def _dual_file(model, path, shift=0.5):
    """A dual-BN checkpoint whose auxiliary BNs hold other statistics and affine parameters."""
    dual = to_dual_bn(copy.deepcopy(model))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in dual.modules():
            if is_dual_bn(m):
                aux = m.aux_bn[0]
                aux.running_mean.add_(shift * torch.randn(aux.running_mean.shape, generator=g))
                aux.running_var.mul_(1 + shift * torch.rand(aux.running_var.shape, generator=g))
                aux.weight.mul_(1 + 0.3 * torch.rand(aux.weight.shape, generator=g))
    save_file({k: v.contiguous() for k, v in dual.state_dict().items()}, str(path))
    return dual


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('aa')
    model = _model()
    save_file(model.state_dict(), str(tmp / 'plain.safetensors'))
    dual = _dual_file(model, tmp / 'dual.safetensors')
    const = copy.deepcopy(model)  # predicts class 0 for every image: no image is clean-correct, none attacked
    with torch.no_grad():
        const.classifier.weight.zero_()
        const.classifier.bias.zero_()
        const.classifier.bias[0] = 1
    save_file(const.state_dict(), str(tmp / 'const.safetensors'))
    staged = _stage(tmp / 'stage', model, 8, seed=0)
    root = tmp / 'imagenet' / 'val'
    for i, (p, pred) in enumerate(staged):
        label = pred if i != 3 else (pred + 1) % 1000  # one wrong
        assert label != 0
        (root / WNIDS[label]).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / WNIDS[label] / f'img{i}.JPEG')
    return type('Toy', (), dict(tmp=tmp, model=model, dual=dual, plain=tmp / 'plain.safetensors',
                                dual_file=tmp / 'dual.safetensors', const=tmp / 'const.safetensors', root=root))


def _cfg(toy, **kw):
    kw.setdefault('checkpoint', str(toy.plain))
    kw.setdefault('img_size', SIZE)
    return EvalConfig(model='test_efficientnet', data_dir=str(toy.root), workers=0, progress=False, batch_size=4,
                      **kw)


def _pixels(toy, data_config, n=None):
    """The eval set in [0, 1] the way a user would build it for the package: timm's transform, no normalisation."""
    transform = timm.data.create_transform(**dict(data_config, mean=(0, 0, 0), std=(1, 1, 1)))
    ds = timm.data.create_dataset('', root=str(toy.root), split='validation', search_split=False,
                                  class_map={w: i for i, w in enumerate(WNIDS)})
    xs, ys = [], []
    for i in range(n or len(ds)):
        img, label = ds[i]
        xs.append(transform(img))
        ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


def test_eval_autoattack_is_the_packages_result_with_metrics_json_and_table(toy, tmp_path, capsys):
    report = run_eval(_cfg(toy, attack='autoattack', eps=[2.0], autoattack_version='custom',
                           autoattack_attacks=['apgd-ce'], num_samples=6, fuse=False))
    aa = report['results']['autoattack'][0]
    data_config = eval_data_config(toy.model, SIZE)
    x, y = _pixels(toy, data_config, 6)
    mean, std = data_config['mean'], data_config['std']  # test_efficientnet's: ImageNet's
    adversary = autoattack_adversary(PixelSpaceModel(copy.deepcopy(toy.model), mean, std), 2.0, 'custom',
                                     ['apgd-ce'], seed=0)
    _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=4)
    robust = (y_adv == y).nonzero().flatten().tolist()
    assert aa['robust'] == robust and aa['top1'] == pytest.approx(100 * len(robust) / 6)
    assert aa['images'] == 6 and report['results']['clean']['images'] == 6  # --num-samples: the first 6
    assert aa['name'] == 'autoattack_custom_eps2' and aa['attacks'][0]['name'] == 'apgd-ce'
    broken = aa['attacks'][0]['broken']
    assert sorted(broken + robust) == sorted(i for i in range(6) if i not in _wrong(x, y, toy, mean, std))
    m = report['metrics']
    assert m['imagenet_autoattack_custom_eps2_top1'] == aa['top1']
    assert m['imagenet_autoattack_custom_eps2_apgd-ce_top1'] == aa['top1']
    assert describe_metric('imagenet_autoattack_eps4_apgd-t_top1') == (
        'ImageNet', 'AutoAttack eps 4 after APGD-T top-1', False)
    assert describe_metric('aux_imagenet_autoattack_plus_eps8_top1') == (
        'ImageNet', 'AutoAttack+ eps 8 top-1 (aux BNs)', False)
    assert len(report['results']['autoattack_images']) == 6
    assert report['settings']['autoattack'] == {'version': 'custom', 'eps': [2.0], 'norm': 'Linf',
                                                'attacks': ['apgd-ce'], 'seed': 0}
    assert report['versions']['pyautoattack']
    text = format_results(report)
    assert '| autoattack_custom_eps2 |' in text and 'after APGD-CE' in text
    assert results_csv_row(report)['autoattack_custom_eps2_top1'] == round(aa['top1'], 4)
    # the fused model (the default) gives the same robust accuracy here
    fused = run_eval(_cfg(toy, attack='autoattack', eps=[2.0], autoattack_version='custom',
                          autoattack_attacks=['apgd-ce'], num_samples=6))
    assert fused['results']['autoattack'][0]['top1'] == aa['top1']


def _wrong(x, y, toy, mean, std):
    """Indices of the clean mistakes (never attacked)."""
    with torch.no_grad():
        pred = PixelSpaceModel(copy.deepcopy(toy.model), mean, std)(x).argmax(-1)
    return set((pred != y).nonzero().flatten().tolist())


def test_cli_pgd_and_autoattack_curves_in_one_plot_beside_the_json(toy, tmp_path, capsys):
    out, plot = tmp_path / 'r.json', tmp_path / 'r.png'
    rc = main(['eval', '--model', 'test_efficientnet', '--checkpoint', str(toy.plain), '--data-dir', str(toy.root),
               '--img-size', str(SIZE), '--workers', '0', '--no-progress', '--batch-size', '8',
               '--attack', 'pgd,autoattack', '--eps', '1,2', '--autoattack-version', 'custom',
               '--autoattack-attacks', 'apgd-ce', '--output', str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert f'plot: {plot}' in text  # no --plot: the curves go beside the JSON
    assert '| pgd3_eps2 |' in text and '| autoattack_custom_eps1 |' in text
    report = read_results(out)
    assert {'imagenet_pgd1_eps1_top1', 'imagenet_autoattack_custom_eps2_top1'} <= set(report['metrics'])
    assert plot.read_bytes()[:4] == b'\x89PNG'
    aa = {r['eps']: r['top1'] for r in report['results']['autoattack']}
    assert aa[2.0] <= aa[1.0] <= report['metrics']['imagenet_top1']


# ----------------------------------------------------------------------------------------------------------
# the auxiliary-BN route

def test_aux_route_differs_from_main_and_fuses_to_the_same_function(toy):
    x = torch.rand(4, 3, SIZE, SIZE) * 2 - 1
    dual = toy.dual
    main_net, aux_net = route_model(dual, 'main'), route_model(dual, 'aux')
    assert not any(is_dual_bn(m) for m in aux_net.modules()) and any(is_dual_bn(m) for m in dual.modules())
    with torch.no_grad():
        with bn_route(dual, 'aux'):
            ref_aux = dual(x)
        ref_main = dual(x)
        out_main, out_aux = main_net(x), aux_net(x)
        assert torch.allclose(out_main, ref_main, atol=1e-5) and torch.allclose(out_aux, ref_aux, atol=1e-5)
        assert (out_aux - out_main).abs().max() > 1e-2 * out_main.abs().max()  # the aux statistics matter
        fused = prepare_eval_model(route_model(dual, 'aux'), (3, SIZE, SIZE), torch.device('cpu'))
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
        out_fused = fused(x)
    assert (out_fused - ref_aux).abs().max() <= 1e-4 * ref_aux.abs().max()


def test_bn_route_both_gives_two_rows_and_aux_metrics(toy, tmp_path, capsys):
    both = run_eval(_cfg(toy, checkpoint=str(toy.dual_file), bn_route='both', attack='pgd', eps=[1.0]))
    main_only = run_eval(_cfg(toy, checkpoint=str(toy.dual_file)))  # folded: the main route
    m = both['metrics']
    assert m['imagenet_top1'] == main_only['metrics']['imagenet_top1'] == pytest.approx(100 * 7 / 8)
    assert {'aux_imagenet_top1', 'aux_imagenet_top5', 'aux_imagenet_pgd1_eps1_top1'} <= set(m)
    assert m['aux_imagenet_top1'] != m['imagenet_top1']  # other statistics, other predictions
    assert describe_metric('aux_imagenet_top1') == ('ImageNet', 'top-1 (aux BNs)', False)
    text = format_results(both)
    assert '| main | imagenet |' in text and '| aux  | imagenet |' in text
    assert both['settings']['bn_route'] == 'both'
    aux = run_eval(_cfg(toy, checkpoint=str(toy.dual_file), bn_route='aux'))
    assert set(aux['metrics']) == {'aux_imagenet_top1', 'aux_imagenet_top5'}
    assert aux['metrics']['aux_imagenet_top1'] == m['aux_imagenet_top1']
    assert results_csv_row(aux)['aux_top1'] == round(m['aux_imagenet_top1'], 4)


# ----------------------------------------------------------------------------------------------------------
# RobustBench's protocol

def test_robustbench_protocol_reads_the_list_in_its_order_and_names_what_is_missing(toy, tmp_path, capsys):
    files = sorted(p.relative_to(toy.root).as_posix() for p in toy.root.glob('*/*.JPEG'))
    listed = [files[5], 'n01440764/ILSVRC2012_val_00000293.JPEG', files[0], files[2]]
    lst = tmp_path / 'ids.txt'
    lst.write_text('\n'.join(listed))  # no newline at the end, as RobustBench's file
    # 224 px crops: AutoAttack's cost there is kept out of the test by a model that gets every image wrong
    report = run_eval(_cfg(toy, img_size=None, protocol='robustbench', robustbench_list=str(lst),
                           checkpoint=str(toy.const)))
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'lacks 1 of the 4 listed images' in err and 'ILSVRC2012_val_00000293' in err
    assert report['data_config']['input_size'] == [3, 224, 224] and report['data_config']['crop_pct'] == 0.875
    assert report['data_config']['interpolation'] == 'bilinear'
    assert report['results']['autoattack_images'] == [files[5], files[0], files[2]]
    assert report['results']['protocol']['found'] == 3 and report['settings']['protocol'] == 'robustbench'
    aa = report['results']['autoattack'][0]
    assert aa['name'] == 'autoattack_eps4' and aa['version'] == 'standard' and aa['eps'] == 4.0
    assert report['results']['clean']['images'] == 3 == aa['images'] and aa['clean_top1'] == 0 == aa['top1']
    # --num-samples takes the first N of the list
    two = run_eval(_cfg(toy, img_size=None, protocol='robustbench', robustbench_list=str(lst), num_samples=2,
                        checkpoint=str(toy.const)))
    assert two['results']['autoattack_images'] == [files[5]] and two['results']['protocol']['listed'] == 2


def test_robustbench_list_from_an_installed_package_without_importing_it(tmp_path, monkeypatch):
    """A robustbench installed as pip --no-deps lays it out (its __init__ would import its model zoo, and
    here raises): the list is found beside it, never by importing it."""
    pkg = tmp_path / 'site' / 'robustbench'
    (pkg / 'helper_files').mkdir(parents=True)
    (pkg / '__init__.py').write_text('raise ImportError("robustbench must not be imported")\n')
    listed = [f'{WNIDS[i]}/ILSVRC2012_val_{i + 1:08d}.JPEG' for i in (7, 3, 900)]
    (pkg / 'helper_files' / 'imagenet_test_image_ids.txt').write_text('\n'.join(listed) + '\n')
    monkeypatch.syspath_prepend(str(tmp_path / 'site'))
    path = robustbench.robustbench_list_path()
    assert path == pkg / 'helper_files' / 'imagenet_test_image_ids.txt'
    assert robustbench.read_image_list(path) == listed  # in the list's order
    (pkg / 'helper_files' / 'imagenet_test_image_ids.txt').unlink()
    with pytest.raises(EvalDataError, match='has no helper_files/imagenet_test_image_ids.txt'):
        robustbench.robustbench_list_path()


def test_robustbench_not_installed_is_one_line(monkeypatch):
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None)
    with pytest.raises(EvalDataError, match='pip install --no-deps robustbench'):
        robustbench.robustbench_list_path()


# ----------------------------------------------------------------------------------------------------------
# bad input: one line, exit 1, nothing written

def _error(capsys, argv, out):
    rc = main(argv + ['--output', str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith('advprop-zoo eval: error: '), err
    assert not out.exists()
    return err


def _args(toy, *extra, ckpt=None):
    return ['eval', '--model', 'test_efficientnet', '--checkpoint', str(ckpt or toy.plain), '--data-dir',
            str(toy.root), '--img-size', str(SIZE), '--workers', '0', '--no-progress', *extra]


def test_bad_inputs_are_one_line_and_write_nothing(toy, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'r.json'
    aa = ['--attack', 'autoattack']
    assert "unknown --autoattack-version 'fast'" in _error(capsys, _args(toy, *aa, '--autoattack-version', 'fast'),
                                                          out)
    assert 'AutoAttack --eps must be > 0' in _error(capsys, _args(toy, *aa, '--eps', '0'), out)
    assert 'bad --eps' in _error(capsys, _args(toy, *aa, '--eps', '256'), out)
    assert "unknown attack 'autoatack'" in _error(capsys, _args(toy, '--attack', 'autoatack'), out)
    err = _error(capsys, _args(toy, '--bn-route', 'aux'), out)
    assert '--bn-route aux needs a dual-BN checkpoint' in err and 'plain.safetensors has none' in err
    assert "unknown --bn-route 'side'" in _error(capsys, _args(toy, '--bn-route', 'side', ckpt=toy.dual_file), out)
    nothing = tmp_path / 'ids.txt'
    nothing.write_text('n01440764/ILSVRC2012_val_00000293.JPEG\nn01443537/ILSVRC2012_val_00000236.JPEG\n')
    rb = ['eval', '--model', 'test_efficientnet', '--checkpoint', str(toy.plain), '--data-dir', str(toy.root),
          '--workers', '0', '--no-progress', '--protocol', 'robustbench', '--robustbench-list', str(nothing)]
    assert 'none of the 2 listed images is in' in _error(capsys, rb, out)
    assert '--protocol robustbench fixes the attack' in _error(capsys, rb + ['--eps', '8'], out)
    assert '--protocol robustbench fixes the preprocessing' in _error(capsys, rb + ['--img-size', '64'], out)
    assert 'needs a model with at least 10 classes' in _error(
        capsys, _args(toy, *aa, ckpt=_three_class(tmp_path)) + ['--dataset', 'folder'], out)
    monkeypatch.setitem(__import__('sys').modules, 'pyautoattack', None)  # import pyautoattack -> ImportError
    err = _error(capsys, _args(toy, *aa), out)
    assert 'needs the pyautoattack package' in err and 'advprop-zoo[robust]' in err


def _three_class(tmp_path):
    path = tmp_path / 'three.safetensors'
    if not path.exists():
        save_file(_model(num_classes=3).state_dict(), str(path))
    return path
