"""advprop-zoo eval speaks timm's validate.py (issue 18): its flags with its meanings, timm dataset specs read
through timm.data.create_dataset, timm train.py checkpoints (EMA by --use-ema only), --results-file as its CSV.

The data are tiny sets the tests write: a 3-class ImageFolder whose labels come from a reference pipeline
(timm's own transform on PIL images, the unfused model; test_eval's helpers), and the same images as a
Hugging Face parquet dataset, so the two readers must give the same numbers.
"""
import argparse
import csv
import io
import os
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from advprop_zoo.cli import build_parser, main
from advprop_zoo.eval.results import read_results
from advprop_zoo.eval.suite import EvalConfig, run_eval
from advprop_zoo.load import load_model
from test_eval import SIZE, _place, _stage, _toy_model

CLASSES = ['a_cat', 'b_dog', 'c_emu']  # folder order = label order = the parquet set's ClassLabel names
VALIDATE_COLUMNS = ['model', 'top1', 'top1_err', 'top5', 'top5_err', 'param_count', 'img_size', 'crop_pct',
                    'interpolation']  # timm validate.py's results row, in its order


def _reference_logits(model, paths, **overrides):
    """Logits of ``paths`` through timm's own eval transform (resolve_data_config with ``overrides``), unfused."""
    cfg = timm.data.resolve_data_config({'img_size': SIZE, **overrides}, model=model)
    transform = timm.data.create_transform(**cfg)
    with torch.no_grad():
        return model.eval()(torch.stack([transform(Image.open(p).convert('RGB')) for p in paths]))


def _top1(logits, labels):
    return 100.0 * sum(int(lg.argmax()) == y for lg, y in zip(logits, labels)) / len(labels)


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """A 3-class model, 6 images (5 in their predicted class folder, 1 in the wrong one: top-1 5/6), the same
    images as a parquet dataset (split validation, plus one blob that is not an image), and a timm train.py
    checkpoint whose state_dict is the model and whose state_dict_ema is another one."""
    tmp = tmp_path_factory.mktemp('timm')
    model = _toy_model(num_classes=3, seed=1)
    ema = _toy_model(num_classes=3, seed=5)
    save_file(model.state_dict(), str(tmp / 'toy3.safetensors'))
    pool = _stage(tmp / 'stage', model, 16, seed=3)[:6]
    assert len(pool) == 6
    labels = [int(lg.argmax()) for _, lg in pool]
    labels[-1] = (labels[-1] + 1) % 3
    items = [(p, CLASSES[y]) for (p, _), y in zip(pool, labels)]
    folder = _place(tmp / 'folder', items)
    for name in CLASSES:
        (folder / name).mkdir(exist_ok=True)

    parquet = tmp / 'hf' / 'validation'
    parquet.mkdir(parents=True)
    images = [{'bytes': Path(p).read_bytes(), 'path': f'img{i}.jpg'} for i, (p, _) in enumerate(pool)]
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=CLASSES)})
    datasets.Dataset.from_dict({'image': images, 'label': labels}, features=features).to_parquet(
        str(parquet / 'data-00000.parquet'))
    broken = tmp / 'hf-broken' / 'validation'
    broken.mkdir(parents=True)
    datasets.Dataset.from_dict(
        {'image': images + [{'bytes': b'not an image at all', 'path': 'notes.jpg'}], 'label': labels + [0]},
        features=features).to_parquet(str(broken / 'data-00000.parquet'))

    ckpt = tmp / 'model_best.pth.tar'
    torch.save({
        'epoch': 11, 'arch': 'test_efficientnet', 'version': 2, 'metric': 1.0,
        'state_dict': model.state_dict(), 'state_dict_ema': ema.state_dict(),
        'optimizer': {'state': {}, 'param_groups': [{'lr': 0.05, 'betas': (0.9, 0.999), 'params': [0, 1]}]},
        'amp_scaler': {'scale': 65536.0, 'growth_factor': 2.0},
        'args': argparse.Namespace(model='test_efficientnet', lr=0.05, mean=None, input_size=[3, SIZE, SIZE],
                                   model_kwargs={}, scale=(0.08, 1.0), model_ema=True, dataset='hfds/x'),
    }, ckpt)
    return SimpleNamespace(tmp=tmp, model=model, ema=ema, ckpt3=tmp / 'toy3.safetensors', timm_ckpt=ckpt,
                           folder=folder, hf=tmp / 'hf', hf_broken=tmp / 'hf-broken', items=items, labels=labels,
                           paths=[p for p, _ in pool])


def _eval(*extra, ckpt=None, toy=None):
    return ['eval', '-m', 'test_efficientnet', '--checkpoint', str(ckpt or toy.ckpt3), '--img-size', str(SIZE),
            '-j', '0', '--no-progress', *extra]


def _error(capsys, argv):
    rc = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith('advprop-zoo eval: error: '), err
    assert captured.out == ''
    return err


def test_hfds_parquet_gives_the_same_numbers_as_the_image_folder(toy, tmp_path):
    """The same six images read as an ImageFolder and through timm's hfds reader (a local parquet dataset):
    the same top-1 / top-5, reported under the metric prefix folder."""
    folder = run_eval(EvalConfig(model='test_efficientnet', data_dir=str(toy.folder), dataset='folder',
                                 checkpoint=str(toy.ckpt3), img_size=SIZE, workers=0, progress=False, batch_size=4))
    hf = run_eval(EvalConfig(model='test_efficientnet', data_dir=str(tmp_path / 'cache'), dataset=f'hfds/{toy.hf}',
                             checkpoint=str(toy.ckpt3), img_size=SIZE, workers=0, progress=False, batch_size=4))
    assert folder['metrics']['folder_top1'] == pytest.approx(100 * 5 / 6)
    assert hf['metrics'] == folder['metrics']
    assert hf['results']['clean']['images'] == 6 and hf['dataset'] == f'hfds/{toy.hf}'
    assert hf['settings']['split'] == 'validation'  # timm validate's default split
    # an iterable read of the same files (hfids: streaming), told its length as timm's --num-samples does
    it = run_eval(EvalConfig(model='test_efficientnet', data_dir=str(tmp_path / 'cache'), dataset=f'hfids/{toy.hf}',
                             checkpoint=str(toy.ckpt3), img_size=SIZE, workers=0, progress=False, batch_size=4,
                             num_samples=6))
    assert it['metrics'] == folder['metrics'] and it['results']['clean']['images'] == 6
    # a map-style set: --num-samples takes its first N images, in its order; N beyond its length is all of it
    for n in (3, 6, 50):
        part = run_eval(EvalConfig(model='test_efficientnet', data_dir=str(tmp_path / 'cache'),
                                   dataset=f'hfds/{toy.hf}', checkpoint=str(toy.ckpt3), img_size=SIZE, workers=0,
                                   progress=False, batch_size=4, num_samples=n))
        assert part['results']['clean']['images'] == min(n, 6) and part['settings']['num_samples'] == n


def test_hfds_through_the_cli_with_timm_spellings(toy, tmp_path, capsys):
    """-m / -b / -j, --dataset hfds/..., --split, --results-file; an unreadable image in the parquet set is
    excluded and named by its path there, as in a folder (ReadableImageDataset wraps timm's hfds dataset)."""
    out, csv_path = tmp_path / 'r.json', tmp_path / 'r.csv'
    assert main(_eval('--dataset', f'hfds/{toy.hf_broken}', '--split', 'validation', '--data-dir',
                      str(tmp_path / 'cache'), '-b', '3', '--output', str(out), '--results-file', str(csv_path),
                      toy=toy)) == 0
    text = capsys.readouterr().out
    assert 'excluded 1 unreadable file (not counted in any number): notes.jpg' in text
    report = read_results(out)
    assert report['metrics']['folder_top1'] == pytest.approx(100 * 5 / 6)
    assert report['results']['clean']['excluded'] == ['notes.jpg'] and report['settings']['batch_size'] == 3
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert len(rows) == 1 and rows[0]['top1'] == str(round(100 * 5 / 6, 4))


def test_results_file_is_timm_validate_csv(toy, tmp_path, capsys):
    csv_path = tmp_path / 'results.csv'
    assert main(_eval('--dataset', 'folder', '--data-dir', str(toy.folder), '--results-file', str(csv_path),
                      toy=toy)) == 0
    assert f'results (timm CSV): {csv_path}' in capsys.readouterr().out
    text = csv_path.read_text()
    reader = csv.DictReader(io.StringIO(text))
    rows = list(reader)
    assert reader.fieldnames == VALIDATE_COLUMNS and len(rows) == 1
    row = rows[0]
    top1 = round(100 * 5 / 6, 4)
    params = sum(p.numel() for p in toy.model.parameters())
    assert row == {'model': 'test_efficientnet', 'top1': str(top1), 'top1_err': str(round(100 - 100 * 5 / 6, 4)),
                   'top5': '100.0', 'top5_err': '0.0', 'param_count': str(round(params / 1e6, 2)),
                   'img_size': str(SIZE), 'crop_pct': '0.95', 'interpolation': 'bicubic'}
    assert [p.name for p in tmp_path.iterdir()] == ['results.csv']  # written atomically: no temp file left

    # an attack sweep: validate.py's columns, its extra metrics after top5_err
    assert main(_eval('--dataset', 'folder', '--data-dir', str(toy.folder), '--results-file', str(csv_path),
                      '--attack', 'fgsm', '--eps', '1,4', toy=toy)) == 0
    header = next(csv.reader(io.StringIO(csv_path.read_text())))
    assert header == VALIDATE_COLUMNS[:5] + ['fgsm_eps1_top1', 'fgsm_eps1_top5', 'fgsm_eps4_top1',
                                             'fgsm_eps4_top5'] + VALIDATE_COLUMNS[5:]


def test_timm_train_checkpoint_evaluates_and_use_ema_picks_the_ema_weights(toy, tmp_path, capsys):
    """model_best.pth.tar as timm's train.py writes it (args as an argparse.Namespace): its state_dict by
    default, the same numbers as the safetensors of those weights; --use-ema evaluates state_dict_ema."""
    plain = run_eval(EvalConfig(model='test_efficientnet', data_dir=str(toy.folder), dataset='folder',
                                checkpoint=str(toy.timm_ckpt), img_size=SIZE, workers=0, progress=False))
    assert plain['metrics']['folder_top1'] == pytest.approx(100 * 5 / 6)
    assert plain['weights']['location'].endswith('model_best.pth.tar') and not plain['settings']['use_ema']

    out = tmp_path / 'ema.json'
    assert main(_eval('--dataset', 'folder', '--data-dir', str(toy.folder), '--use-ema', '--output', str(out),
                      ckpt=toy.timm_ckpt)) == 0
    capsys.readouterr()
    ema = read_results(out)
    expected = _top1(_reference_logits(toy.ema, toy.paths), toy.labels)
    assert ema['settings']['use_ema'] and ema['metrics']['folder_top1'] == pytest.approx(expected)
    # the loaded tensors themselves: EMA with use_ema, the training weights without
    with_ema = load_model('test_efficientnet', checkpoint=toy.timm_ckpt, use_ema=True).model.state_dict()
    without = load_model('test_efficientnet', checkpoint=toy.timm_ckpt).model.state_dict()
    assert all(torch.equal(with_ema[k], v) for k, v in toy.ema.state_dict().items())
    assert all(torch.equal(without[k], v) for k, v in toy.model.state_dict().items())
    assert not torch.equal(with_ema['classifier.weight'], without['classifier.weight'])


class _Foreign:
    """A class no checkpoint may make eval import and build."""


class _Payload:
    def __reduce__(self):
        return (os.system, (f'touch {self.sentinel}',))


def test_bad_timm_inputs_are_one_line_and_leave_nothing(toy, tmp_path, capsys):
    out, res = tmp_path / 'out' / 'r.json', tmp_path / 'out' / 'r.csv'
    out.parent.mkdir()
    outputs = ['--output', str(out), '--results-file', str(res)]
    base = ['--dataset', 'folder', '--data-dir', str(toy.folder), *outputs]

    # a .pth.tar holding a foreign class (in its args, or code to run): refused, never built
    sd = toy.model.state_dict()
    foreign = tmp_path / 'foreign.pth.tar'
    torch.save({'state_dict': sd, 'args': argparse.Namespace(model='x', opt=_Foreign())}, foreign)
    err = _error(capsys, _eval(*base, ckpt=foreign))
    assert f'{foreign}: refused to unpickle: it holds a {__name__}._Foreign object' in err
    _Payload.sentinel = tmp_path / 'pwned'
    hostile = tmp_path / 'hostile.pth.tar'
    torch.save({'state_dict': sd, 'args': argparse.Namespace(model='x', hook=_Payload())}, hostile)
    assert 'hostile.pth.tar: refused to unpickle' in _error(capsys, _eval(*base, ckpt=hostile))
    assert not _Payload.sentinel.exists()

    # --use-ema on files without EMA weights, or without a checkpoint
    no_ema = tmp_path / 'last.pth.tar'
    torch.save({'epoch': 1, 'state_dict': sd, 'args': argparse.Namespace(model='x')}, no_ema)
    assert 'last.pth.tar: no EMA weights (state_dict_ema / model_ema)' in _error(
        capsys, _eval(*base, '--use-ema', ckpt=no_ema))
    assert 'a safetensors file holds one state dict, no EMA weights' in _error(
        capsys, _eval(*base, '--use-ema', toy=toy))
    assert '--use-ema picks the EMA weights of a --checkpoint' in _error(capsys, [
        'eval', '-m', 'test_efficientnet', '--pretrained', '--use-ema', *base])

    # datasets: an unknown prefix, a missing split (timm spec and folder layout), classes that do not fit
    assert "unknown dataset prefix 'foo/'; choose one of imagenet" in _error(
        capsys, _eval('--dataset', 'foo/bar', '--data-dir', str(toy.folder), *outputs, toy=toy))
    assert "unknown dataset 'imagenett'" in _error(capsys, _eval('--dataset', 'imagenett', *base[2:], toy=toy))
    err = _error(capsys, _eval('--dataset', f'hfds/{toy.hf}', '--split', 'train', '--data-dir',
                               str(tmp_path / 'cache'), *outputs, toy=toy))
    assert f"hfds/{toy.hf}: cannot read split 'train'" in err and 'validation' in err
    assert "folder: no split 'train' in" in _error(capsys, _eval(*base, '--split', 'train', toy=toy))
    ckpt1000 = tmp_path / 'toy1000.safetensors'
    save_file(_toy_model().state_dict(), str(ckpt1000))
    assert f'hfds/{toy.hf}: the set has 3 classes but the model has 1000' in _error(
        capsys, _eval('--dataset', f'hfds/{toy.hf}', '--data-dir', str(tmp_path / 'cache'), *outputs, ckpt=ckpt1000))
    assert '--data-dir is required for torch/cifar10' in _error(capsys, _eval('--dataset', 'torch/cifar10', toy=toy))

    # data-config overrides that timm would assert on
    assert '--mean takes 1 value or 3 (one per input channel), got 2: 0.5 0.5' in _error(
        capsys, _eval(*base, '--mean', '0.5', '0.5', toy=toy))
    assert '--std values must be > 0' in _error(capsys, _eval(*base, '--std', '0', toy=toy))
    assert '--crop-pct must be in (0, 1]' in _error(capsys, _eval(*base, '--crop-pct', '0', toy=toy))
    assert '--class-map applies to --dataset folder' in _error(
        capsys, _eval('--data-dir', str(toy.folder), '--class-map', str(tmp_path / 'm.txt'), *outputs, toy=toy))
    assert "--amp-dtype needs --amp" in _error(capsys, _eval(*base, '--amp-dtype', 'bfloat16', toy=toy))
    assert list(out.parent.iterdir()) == []  # no results, no temp files


def test_preprocessing_overrides_reach_the_loader(toy, tmp_path):
    """--crop-pct / --interpolation / --mean / --std change the data config as timm's resolve_data_config
    does, and the numbers are those of timm's own transform with the same overrides."""
    overrides = dict(crop_pct=0.75, interpolation='bilinear', mean=(0.3, 0.4, 0.5), std=(0.2,))
    out = tmp_path / 'r.json'
    assert main(_eval('--dataset', 'folder', '--data-dir', str(toy.folder), '--crop-pct', '0.75', '--interpolation',
                      'bilinear', '--mean', '0.3', '0.4', '0.5', '--std', '0.2', '--no-fuse', '--output', str(out),
                      toy=toy)) == 0
    report = read_results(out)
    assert report['data_config']['crop_pct'] == 0.75 and report['data_config']['interpolation'] == 'bilinear'
    assert report['data_config']['mean'] == [0.3, 0.4, 0.5] and report['data_config']['std'] == [0.2, 0.2, 0.2]
    expected = _top1(_reference_logits(toy.model, toy.paths, **overrides), toy.labels)
    assert report['metrics']['folder_top1'] == pytest.approx(expected)


def test_split_and_class_map_on_a_folder(toy, tmp_path):
    """--split picks a subfolder under timm's synonyms (validation finds val/); --class-map relabels a folder
    as timm's .txt class maps do (label = line number)."""
    root = tmp_path / 'data'
    _place(root / 'val', toy.items)
    _place(root / 'train', toy.items[:1])
    for name in CLASSES:
        (root / 'val' / name).mkdir(exist_ok=True)
    report = run_eval(EvalConfig(model='test_efficientnet', data_dir=str(root), dataset='folder', split='validation',
                                 checkpoint=str(toy.ckpt3), img_size=SIZE, workers=0, progress=False))
    assert report['data_dir'].endswith('val') and report['metrics']['folder_top1'] == pytest.approx(100 * 5 / 6)
    class_map = tmp_path / 'classes.txt'
    class_map.write_text('c_emu\nb_dog\na_cat\n')  # reversed: a_cat -> 2, c_emu -> 0
    relabelled = run_eval(EvalConfig(model='test_efficientnet', data_dir=str(root / 'val'), dataset='folder',
                                     class_map=str(class_map), checkpoint=str(toy.ckpt3), img_size=SIZE, workers=0,
                                     progress=False))
    logits = _reference_logits(toy.model, toy.paths)
    expected = _top1(logits, [2 - y for y in toy.labels])
    assert relabelled['metrics']['folder_top1'] == pytest.approx(expected)


def test_timm_flag_spellings_parse_to_the_same_settings():
    parser = build_parser()
    short = parser.parse_args(['eval', '-m', 'efficientnet_b0_advprop', '-b', '32', '-j', '2', '--amp'])
    long = parser.parse_args(['eval', '--model', 'efficientnet_b0_advprop', '--batch-size', '32', '--workers', '2',
                              '--amp', 'fp16'])
    assert (short.model, short.batch_size, short.workers) == (long.model, long.batch_size, long.workers)
    args = parser.parse_args(['eval', '-m', 'x', '--mean', '0.5', '--std', '0.5', '0.5', '0.5', '--crop-pct', '0.9',
                              '--interpolation', 'bilinear', '--use-ema', '--results-file', 'r.csv', '--split', 'val',
                              '--class-map', 'm.txt', '--input-img-mode', 'RGB', '--dataset-download',
                              '--num-samples', '10', '--dataset', 'hfds/imagenet-1k', '--input-size', '3', '64', '64'])
    assert args.mean == [0.5] and args.std == [0.5, 0.5, 0.5] and args.crop_pct == 0.9 and args.use_ema
    assert args.results_file == 'r.csv' and args.split == 'val' and args.num_samples == 10
    assert args.input_size == [3, 64, 64] and args.dataset == 'hfds/imagenet-1k'
    assert parser.parse_args(['eval', '-m', 'x']).split is None  # timm specs default to validation at run time


def test_bare_amp_is_timm_float16_and_amp_dtype_picks_bf16(toy, tmp_path, capsys):
    out = tmp_path / 'r.json'
    assert main(_eval('--dataset', 'folder', '--data-dir', str(toy.folder), '--amp', '--amp-dtype', 'bfloat16',
                      '--output', str(out), toy=toy)) == 0
    capsys.readouterr()
    assert read_results(out)['settings']['amp'] == 'bf16'
    assert '--amp bf16 and --amp-dtype float16 disagree' in _error(
        capsys, _eval('--dataset', 'folder', '--data-dir', str(toy.folder), '--amp', 'bf16', '--amp-dtype', 'float16',
                      toy=toy))
