"""Unreadable images (issue 17): a truncated JPEG and a text file named .png in eval and train folders.

timm's ImageDataset would hand back the next sample in their place (counted twice in eval, skipped without
a word in training). Here eval counts exactly the readable images, names the others in the table and the
JSON, and gives the same numbers as the folder without them; training warns once per file, counts them
per epoch, and --strict-images stops with one line naming the file.
"""
import io
import json
import logging
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import advprop_zoo.eval.accuracy as accuracy
from advprop_zoo.cli import main
from advprop_zoo.eval.datasets import class_map_for, create_eval_loader, imagenet_synsets
from advprop_zoo.eval.results import read_results
from advprop_zoo.eval.suite import EvalConfig, eval_data_config, run_eval
from advprop_zoo.images import ReadableImageDataset, split_unreadable, unreadable_index, unreadable_label
from advprop_zoo_train import build_parser

SIZE = 32
TRUNCATED, NOT_AN_IMAGE = 'b_truncated.jpg', 'c_notes.png'


def _jpeg(rng, size=40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format='JPEG', quality=90)
    return buf.getvalue()


def _add_bad_files(folder, rng):
    """A real JPEG cut in half, and a text file under an image name, in ``folder``."""
    data = _jpeg(rng)
    (folder / TRUNCATED).write_bytes(data[:len(data) // 2])
    (folder / NOT_AN_IMAGE).write_text('these are notes, not pixels\n')


def _image_folder(root, classes, per_class, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / c / f'{i}.jpg').write_bytes(_jpeg(rng))
    return root


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """A 3-class folder (9 readable images), the same folder with the two bad files in class a, and a checkpoint."""
    tmp = tmp_path_factory.mktemp('unreadable')
    clean = _image_folder(tmp / 'clean', ['a', 'b', 'c'], 3)
    dirty = tmp / 'dirty'
    shutil.copytree(clean, dirty)
    _add_bad_files(dirty / 'a', np.random.default_rng(1))
    torch.manual_seed(0)
    model = timm.create_model('test_efficientnet', num_classes=3).eval()
    save_file(model.state_dict(), str(tmp / 'toy3.safetensors'))
    return tmp, clean, dirty, tmp / 'toy3.safetensors'


def _eval_args(ckpt, data_dir, *extra):
    return ['eval', '--model', 'test_efficientnet', '--checkpoint', str(ckpt), '--data-dir', str(data_dir),
            '--dataset', 'folder', '--img-size', str(SIZE), '--workers', '0', '--no-progress', '--batch-size', '4',
            *extra]


def test_placeholders_carry_the_index_and_the_right_shape(toy):
    _, _, dirty, _ = toy
    loader = create_eval_loader(dirty, class_map_for('folder', dirty, 3),
                                eval_data_config(timm.create_model('test_efficientnet'), SIZE), 16,
                                torch.device('cpu'), workers=0)
    ds = loader.dataset
    assert isinstance(ds, ReadableImageDataset) and len(ds) == 11
    bad = {ds.filename(i): i for i in range(len(ds)) if ds.read_error(i) is not None}
    assert set(bad) == {f'a/{TRUNCATED}', f'a/{NOT_AN_IMAGE}'}
    assert 'truncated' in ds.read_error(bad[f'a/{TRUNCATED}'])
    assert ds.read_error(bad[f'a/{NOT_AN_IMAGE}']) == 'not an image file PIL can identify'
    x, y = next(iter(loader))
    for name, i in bad.items():
        img, label = ds[i]
        assert label == unreadable_label(i) < 0 and unreadable_index(label) == i
        assert img.shape == x.shape[1:]  # collates with the readable images
    kept_x, kept_y, dropped = split_unreadable(x, y)
    assert sorted(dropped) == sorted(bad.values()) and len(kept_y) == 9 and (kept_y >= 0).all()
    assert len(kept_x) == 9
    assert split_unreadable(kept_x, kept_y)[0] is kept_x  # nothing to drop: the same tensors back


def test_eval_counts_each_readable_image_once_and_names_the_rest(toy, tmp_path, capsys):
    _, clean, dirty, ckpt = toy
    out, ref_out = tmp_path / 'dirty.json', tmp_path / 'clean.json'
    assert main(_eval_args(ckpt, dirty, '--attack', 'fgsm', '--eps', '2', '--output', str(out))) == 0
    text = capsys.readouterr().out
    assert main(_eval_args(ckpt, clean, '--attack', 'fgsm', '--eps', '2', '--output', str(ref_out))) == 0
    ref_text = capsys.readouterr().out
    report, ref = read_results(out), read_results(ref_out)
    names = sorted([f'a/{TRUNCATED}', f'a/{NOT_AN_IMAGE}'])
    assert report['schema'] == 'advprop-zoo-eval/1'
    assert report['results']['clean']['images'] == 9 and sorted(report['results']['clean']['excluded']) == names
    robust = report['results']['robust'][0]
    assert robust['images'] == 9 and sorted(robust['excluded']) == names
    assert report['metrics'] == ref['metrics']  # the same numbers as the folder without the bad files
    assert ref['results']['clean']['excluded'] == [] and 'excluded' not in ref_text
    # the table: an excluded column and one line naming both files
    header = next(line for line in text.splitlines() if line.startswith('| set '))
    assert header.rstrip(' |').endswith('excluded')
    assert '| folder |      9 |' in text and '| fgsm_eps2 |' in text
    line = next(line for line in text.splitlines() if line.startswith('excluded 2 unreadable files'))
    assert all(n in line for n in names)


def test_eval_labels_on_the_device_are_masked_there(toy, monkeypatch):
    """The prefetcher's path (labels already on the device), taken here on the CPU: placeholders go through
    the model, never hit, and are subtracted from the count at the end."""
    _, clean, dirty, ckpt = toy
    cfg = dict(model='test_efficientnet', checkpoint=str(ckpt), dataset='folder', img_size=SIZE, workers=0,
               progress=False, batch_size=4)
    ref = run_eval(EvalConfig(data_dir=str(clean), **cfg))
    monkeypatch.setattr(accuracy, '_on_host', lambda labels: False)
    report = run_eval(EvalConfig(data_dir=str(dirty), attack='pgd', eps=[1.0], **cfg))
    assert report['results']['clean']['images'] == 9
    assert sorted(report['results']['clean']['excluded']) == sorted([f'a/{TRUNCATED}', f'a/{NOT_AN_IMAGE}'])
    assert report['metrics']['folder_top1'] == ref['metrics']['folder_top1']
    assert report['metrics']['folder_top5'] == ref['metrics']['folder_top5']
    assert report['results']['robust'][0]['images'] == 9


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA (timm\'s prefetcher)')
def test_eval_with_the_cuda_prefetcher(toy):
    _, clean, dirty, ckpt = toy
    cfg = dict(model='test_efficientnet', checkpoint=str(ckpt), dataset='folder', img_size=SIZE, workers=0,
               progress=False, batch_size=4, device='cuda')
    ref, report = run_eval(EvalConfig(data_dir=str(clean), **cfg)), run_eval(EvalConfig(data_dir=str(dirty), **cfg))
    assert report['results']['clean']['images'] == 9 and len(report['results']['clean']['excluded']) == 2
    assert report['metrics'] == ref['metrics']


def test_imagenet_c_lists_excluded_files_under_their_corruption(tmp_path):
    wnid = imagenet_synsets()[0]
    rng = np.random.default_rng(2)
    for s in range(1, 6):
        _image_folder(tmp_path / 'c' / 'snow' / str(s), [wnid], 2, seed=s)
    _add_bad_files(tmp_path / 'c' / 'snow' / '3' / wnid, rng)
    torch.manual_seed(0)
    save_file(timm.create_model('test_efficientnet').state_dict(), str(tmp_path / 'toy.safetensors'))
    report = run_eval(EvalConfig(model='test_efficientnet', data_dir=str(tmp_path / 'c'), dataset='imagenet-c',
                                 checkpoint=str(tmp_path / 'toy.safetensors'), corruptions=['snow'], img_size=SIZE,
                                 workers=0, progress=False))
    c = report['results']['imagenet_c']
    assert c['images'] == 10
    assert sorted(c['excluded']) == sorted(f'snow/3/{wnid}/{n}' for n in (TRUNCATED, NOT_AN_IMAGE))


def test_eval_of_only_unreadable_files_is_one_line(toy, tmp_path, capsys):
    _, _, _, ckpt = toy
    for c in 'abc':
        (tmp_path / 'bad' / c).mkdir(parents=True)
        _add_bad_files(tmp_path / 'bad' / c, np.random.default_rng(3))
    assert main(_eval_args(ckpt, tmp_path / 'bad')) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'no readable images to evaluate' in err and '5 more' in err


TINY = ['--model', 'test_efficientnet', '--input-size', '3', '32', '32', '--batch-size', '8', '--opt', 'adamw',
        '--lr', '1e-3', '--sched', 'cosine', '--warmup-epochs', '0', '--workers', '0', '--hflip', '0',
        '--mode', 'vanilla']


@pytest.fixture(scope='module')
def train_folder(tmp_path_factory):
    """train/: 7 + 7 readable images and the two bad files (16 = two full batches of 8, so every file is met
    every epoch); val/: 2 + 2 readable and one truncated JPEG."""
    root = tmp_path_factory.mktemp('train-data')
    _image_folder(root / 'train', ['a', 'b'], 7)
    _add_bad_files(root / 'train' / 'a', np.random.default_rng(4))
    _image_folder(root / 'val', ['a', 'b'], 2, seed=5)
    data = _jpeg(np.random.default_rng(6))
    (root / 'val' / 'b' / 'cut.jpg').write_bytes(data[:len(data) // 2])
    return root


def test_training_warns_once_per_file_and_counts_them(train_folder, tmp_path, caplog, capsys):
    out = tmp_path / 'run'
    with caplog.at_level(logging.WARNING):
        assert main(['train', *TINY, '--epochs', '2', '--data-dir', str(train_folder), '--output', str(out)]) == 0
    warnings = [r.getMessage() for r in caplog.records if 'unreadable' in r.getMessage()]
    for name in (f'train/a/{TRUNCATED}', f'train/a/{NOT_AN_IMAGE}', 'val/b/cut.jpg'):
        assert sum(name in w for w in warnings) == 1, (name, warnings)  # once, over two epochs
    assert len(warnings) == 3
    assert any('not an image file PIL can identify' in w for w in warnings)
    lines = [line for line in capsys.readouterr().out.splitlines() if ' epoch ' in line and ': loss ' in line]
    assert len(lines) == 2 and all(line.endswith('; 2 unreadable images skipped') for line in lines)
    summary = json.loads((out / 'summary.json').read_text())
    assert [row['unreadable_images'] for row in summary['epochs_log']] == [2, 2]
    header = (out / 'log.csv').read_text().splitlines()[0]
    assert header == 'epoch,step,lr,train_loss,clean_loss,adv_loss,val_top1,images_per_s'  # columns unchanged


def test_strict_images_is_a_one_line_error(train_folder, tmp_path, capsys):
    assert main(['train', *TINY, '--epochs', '1', '--no-progress', '--strict-images', '--data-dir',
                 str(train_folder), '--output', str(tmp_path / 'run')]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('advprop-zoo train: error: '), err
    assert (TRUNCATED in err or NOT_AN_IMAGE in err) and 'unreadable training image' in err
    assert '--strict-images' in build_parser().format_help()


def test_a_batch_of_only_unreadable_images_stops_training(tmp_path, capsys):
    root = tmp_path / 'data'
    for c in 'ab':
        (root / 'train' / c).mkdir(parents=True)
        for k in range(2):
            _add_bad_files(root / 'train' / c, np.random.default_rng(k))
            for n in (TRUNCATED, NOT_AN_IMAGE):
                (root / 'train' / c / n).rename(root / 'train' / c / f'{k}{n}')
    _image_folder(root / 'val', ['a', 'b'], 1)
    assert main(['train', *TINY, '--epochs', '1', '--no-progress', '--data-dir', str(root),
                 '--output', str(tmp_path / 'run')]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'every image of batch 1 of epoch 1 is unreadable (8, e.g. ' in err, err
