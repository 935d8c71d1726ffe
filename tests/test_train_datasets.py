"""advprop-zoo train on datasets by timm's names: the same digits images as a folder, an hfds/ parquet folder
and wds/ shards (written here, offline), trained through timm's own readers; folder and hfds end with the same
weights bit for bit; iterable shards split over ranks x workers without duplicates; bad input is one line."""
import io
import json
import shutil
import importlib.util
import time
from pathlib import Path

import datasets  # the train / dev extras
import numpy as np
import pytest
import webdataset as wds
import torch
from PIL import Image
from safetensors.torch import load_file

from advprop_zoo_train import build_parser, train
from advprop_zoo_train.data import (
    DataError, IterableTrainLoader, ReadableImageDataset, create_loaders, digits_folder, resolve_splits,
)
from conftest import cli_fails

datasets.disable_progress_bars()  # their bars go to stderr, where a failed run must write one line

PER_CLASS = {'train': 24, 'val': 6}  # 240 / 60 of the 1,437 / 360 digits: one quick epoch
RUN = ['--model', 'test_efficientnet', '--input-size', '3', '32', '32', '--epochs', '1', '--batch-size', '16',
       '--opt', 'adamw', '--lr', '1e-3', '--sched', 'cosine', '--warmup-epochs', '0', '--workers', '0',
       '--scale', '0.5', '1.0', '--mode', 'vanilla', '--device', 'cpu', '--no-progress']
DATA_CONFIG = dict(input_size=(3, 16, 16), interpolation='bilinear', mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)


# ----------------------------------------------------------------------------------------------- writers
def folder_samples(split_dir: Path):
    """``(path, label)`` of a folder split in the order timm's folder reader lists them, and its class names."""
    from timm.data import create_dataset
    reader = create_dataset('', root=str(split_dir), search_split=False).reader
    names = [c for c, _ in sorted(reader.class_to_idx.items(), key=lambda kv: kv[1])]
    return [(Path(p), int(t)) for p, t in reader.samples], names


def write_hfds(folder: Path, out: Path, train_shards: int = 4) -> Path:
    """The folder's train/ and val/ as a Hugging Face parquet dataset folder (image bytes + ClassLabel), rows in
    timm's folder order, train in ``train_shards`` files; as ``datasets`` writes a Hub dataset."""
    for split, name, shards in (('train', 'train', train_shards), ('val', 'validation', 1)):
        samples, classes = folder_samples(folder / split)
        features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=classes)})
        rows = [{'image': {'bytes': p.read_bytes(), 'path': f'{split}/{p.parent.name}/{p.name}'}, 'label': t}
                for p, t in samples]
        ds = datasets.Dataset.from_list(rows, features=features)
        (out / 'data').mkdir(parents=True, exist_ok=True)
        for i in range(shards):
            part = out / 'data' / f'{name}-{i:05d}-of-{shards:05d}.parquet'
            ds.shard(shards, i, contiguous=True).to_parquet(str(part))
    return out


def write_wds(folder: Path, out: Path, train_shards: int = 4) -> Path:
    """The folder's train/ and val/ as webdataset shards (``<key>.png`` + ``<key>.cls``, as timm's wds reader
    reads them), in timm's folder order, with the ``_info.json`` naming the splits, their shards and sizes."""
    out.mkdir(parents=True, exist_ok=True)
    info = {'name': 'digits', 'splits': {}}
    for split, name, shards in (('train', 'train', train_shards), ('val', 'validation', 1)):
        samples, _ = folder_samples(folder / split)
        per = -(-len(samples) // shards)
        files, lengths = [], []
        for i in range(shards):
            part = samples[i * per:(i + 1) * per]
            fn = f'digits-{name}-{i:04d}.tar'
            with wds.TarWriter(str(out / fn)) as sink:
                for p, t in part:
                    sink.write({'__key__': f'{p.parent.name}_{p.stem}', 'png': p.read_bytes(), 'cls': t})
            files.append(fn)
            lengths.append(len(part))
        info['splits'][name] = {'name': name, 'num_samples': sum(lengths), 'filenames': files,
                                'shard_lengths': lengths}
    (out / '_info.json').write_text(json.dumps(info))
    return out


def _png(value: int) -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value % 256, np.uint8)).save(b, 'PNG')
    return b.getvalue()


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    """A class-balanced subset of the embedded digits folder (train 240, val 60 images, 32 px)."""
    full = digits_folder(tmp_path_factory.mktemp('cache'))
    root = tmp_path_factory.mktemp('digits')
    for split, n in PER_CLASS.items():
        for c in sorted((full / split).iterdir()):
            (root / split / c.name).mkdir(parents=True)
            for f in sorted(c.iterdir())[:n]:
                shutil.copy(f, root / split / c.name / f.name)
    return root


@pytest.fixture(scope='module')
def hfds_dir(digits, tmp_path_factory):
    out = write_hfds(digits, tmp_path_factory.mktemp('hf') / 'digits')
    resolve_splits(_args(out.parent, tmp_path_factory.mktemp('o'), '--dataset', 'hfds/digits'))  # cache prepared
    return out


@pytest.fixture(scope='module')
def wds_dir(digits, tmp_path_factory):
    return write_wds(digits, tmp_path_factory.mktemp('wds'))


@pytest.fixture(scope='module')
def indexed(tmp_path_factory):
    """96 samples whose label is their index: 8 wds shards of 12 and 4 parquet shards of 24."""
    root = tmp_path_factory.mktemp('indexed')
    for i in range(8):
        with wds.TarWriter(str(root / f'part-{i:02d}.tar')) as sink:
            for k in range(12 * i, 12 * i + 12):
                sink.write({'__key__': f'{k:04d}', 'png': _png(k), 'cls': k})
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.Value('int64')})
    (root / 'pq' / 'data').mkdir(parents=True)
    for i in range(4):
        rows = [{'image': {'bytes': _png(k), 'path': None}, 'label': k} for k in range(24 * i, 24 * i + 24)]
        datasets.Dataset.from_list(rows, features=features).to_parquet(
            str(root / 'pq' / 'data' / f'train-{i:05d}-of-00004.parquet'))
    datasets.Dataset.from_list(rows[:8], features=features).to_parquet(
        str(root / 'pq' / 'data' / 'validation-00000-of-00001.parquet'))
    return root


def _args(data_dir, out, *extra):
    return build_parser().parse_args([*RUN, '--data-dir', str(data_dir), '--output', str(out), *extra])


def _weights(out: Path):
    return load_file(str(out / 'model.safetensors'))


# ------------------------------------------------------------------------------------------------- tests
def test_the_three_layouts_hold_the_same_images_in_the_same_order(digits, hfds_dir, wds_dir):
    samples, classes = folder_samples(digits / 'train')
    hf = datasets.load_dataset(str(hfds_dir), split='train')
    assert hf.features['label'].names == classes == [str(i) for i in range(10)]
    assert [r['label'] for r in hf] == [t for _, t in samples]
    assert hf[17]['image'].tobytes() == Image.open(samples[17][0]).tobytes()
    info = json.loads((wds_dir / '_info.json').read_text())
    assert info['splits']['train']['num_samples'] == len(samples) == 240


def test_existing_trees_and_the_digits_folder_read_as_before(digits, tmp_path):
    # val/ is found for timm's default --val-split 'validation'; the embedded digits folder too
    assert resolve_splits(_args(digits, tmp_path)) == [str(i) for i in range(10)]
    full = digits_folder(tmp_path / 'cache')
    assert resolve_splits(_args(full, tmp_path)) == [str(i) for i in range(10)]
    train_loader, val_loader, _ = create_loaders(_args(full, tmp_path), DATA_CONFIG)
    assert train_loader.steps_per_epoch == 1437 // 16 and len(val_loader.dataset) == 360


def test_folder_hfds_and_torch_folder_train_to_the_same_weights(digits, hfds_dir, tmp_path):
    """The same images in the same order through timm's folder reader, its hfds reader and torchvision's
    ImageFolder: one epoch ends with the same weights bit for bit (the resumable sampler and per-image seeded
    augmentation do not depend on the reader)."""
    folder = train(_args(digits, tmp_path / 'folder'))
    hf = train(_args(hfds_dir.parent, tmp_path / 'hfds', '--dataset', 'hfds/digits'))
    tv = train(_args(digits, tmp_path / 'torch', '--dataset', 'torch/folder'))
    assert folder.summary['steps'] == hf.summary['steps'] == tv.summary['steps'] == 240 // 16
    ref = _weights(tmp_path / 'folder')
    for other in ('hfds', 'torch'):
        got = _weights(tmp_path / other)
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(ref[k], got[k]), (other, k)
    assert folder.summary['val_top1'] == hf.summary['val_top1'] == tv.summary['val_top1']


def test_hfds_with_workers_and_the_other_spellings(hfds_dir, tmp_path):
    # hfds/ alone: --data-dir is the dataset folder
    result = train(_args(hfds_dir, tmp_path / 'a', '--dataset', 'hfds/', '--workers', '2'))
    assert result.summary['finished'] and result.summary['steps'] == 15
    # timm's (and advprop-zoo eval's) spelling: the dataset's path as NAME, --data-dir the datasets cache
    result = train(_args(tmp_path / 'cache', tmp_path / 'b', '--dataset', f'hfds/{hfds_dir}'))
    assert result.summary['steps'] == 15 and any((tmp_path / 'cache').iterdir())


@pytest.mark.parametrize('workers', [0, 2])
def test_wds_trains_one_epoch(wds_dir, tmp_path, workers):
    extra = ['--workers', str(workers), '--num-classes', '10']  # timm's wds reader does not name classes
    if workers:  # shards by pattern, the size given: no _info.json needed
        (tmp_path / 'shards').mkdir()
        for f in wds_dir.glob('*.tar'):
            (tmp_path / 'shards' / f.name).symlink_to(f)
        data_dir = tmp_path / 'shards'
        extra += ['--train-split', 'digits-train-{0000..0003}.tar', '--train-num-samples', '240',
                  '--val-split', 'digits-validation-0000.tar|60']
    else:
        data_dir = wds_dir
    result = train(_args(data_dir, tmp_path / 'out', '--dataset', 'wds/digits', *extra))
    # 240 samples over max(1, workers) readers, each padded to whole batches of 16
    assert result.summary['steps'] == {0: 15, 2: 16}[workers] and result.summary['finished']
    assert _weights(tmp_path / 'out')['classifier.weight'].shape[0] == 10


def test_hfids_trains_one_epoch(hfds_dir, tmp_path):
    result = train(_args(hfds_dir.parent, tmp_path, '--dataset', 'hfids/digits', '--workers', '2', '--num-classes',
                         '10', '--train-num-samples', '240', '--val-num-samples', '60'))
    assert result.summary['finished'] and result.summary['steps'] == 16


@pytest.mark.parametrize('prefix', ['wds', 'hfids'])
def test_two_ranks_x_two_workers_see_each_sample_once(indexed, prefix):
    """Rank r of 2 built as under torchrun (the reader told its rank), 2 loader workers each: over an epoch
    the 4 readers together yield every sample exactly once, in the same number of steps on both ranks; the
    next epoch again, in another order."""
    if prefix == 'wds':
        data = ['--data-dir', str(indexed), '--dataset', 'wds/indexed', '--train-split', 'part-{00..07}.tar|96',
                '--val-split', 'part-{00..07}.tar|96']
        val_labels = list(range(96))
    else:
        data = ['--data-dir', str(indexed), '--dataset', 'hfids/pq', '--train-num-samples', '96',
                '--val-num-samples', '8']
        val_labels = list(range(72, 80))
    args = build_parser().parse_args([*RUN, '--batch-size', '8', '--workers', '2', '--num-classes', '96', *data])
    both = [create_loaders(args, DATA_CONFIG, rank=r, world_size=2) for r in range(2)]
    loaders = [train for train, _, _ in both]
    # validation: each sample once over the two ranks too
    assert sorted(v for _, val, _ in both for _, y in val for v in y.tolist()) == val_labels
    assert all(isinstance(t, IterableTrainLoader) for t in loaders)
    assert loaders[0].steps_per_epoch == loaders[1].steps_per_epoch == 6  # 96 / (2 x 2 readers) / 8
    orders = []
    for epoch in range(2):
        seen, per_rank = [], []
        for t in loaders:
            assert t.set_epoch(epoch, 0) == 0
            batches = [y.tolist() for _, y in t]
            per_rank.append(len(batches))
            seen += [v for b in batches for v in b]
        assert per_rank == [6, 6]
        assert sorted(seen) == list(range(96)), f'epoch {epoch}: duplicates or gaps'
        orders.append(seen)
    assert orders[0] != orders[1]  # the epoch reaches the shard / sample shuffles


def test_iterable_resume_mid_epoch_restarts_the_epoch(wds_dir, tmp_path, capsys):
    first = train(_args(wds_dir, tmp_path, '--dataset', 'wds/digits', '--num-classes', '10', '--max-steps', '5'))
    assert first.summary['steps'] == 5 and not first.summary['finished']
    capsys.readouterr()
    done = train(_args(wds_dir, tmp_path, '--dataset', 'wds/digits', '--num-classes', '10', '--resume', 'auto'))
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if 'cannot start mid-epoch' in line]
    assert len(said) == 1 and 'epoch 1 restarts from its first batch, not batch 6' in said[0], out
    assert done.summary['finished'] and done.summary['steps'] == 5 + 15


def test_hfds_unreadable_rows_are_marked_and_named(digits, tmp_path):
    """An hfds row whose image bytes do not decode arrives as a placeholder (label -(index + 1)), named by
    its stored path (or split and index), like a bad file of a folder."""
    samples, classes = folder_samples(digits / 'val')
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=classes)})
    rows = [{'image': {'bytes': p.read_bytes(), 'path': None}, 'label': t} for p, t in samples[:4]]
    rows[1]['image'] = {'bytes': samples[1][0].read_bytes()[:60], 'path': 'cut.png'}  # truncated PNG
    rows[2]['image'] = {'bytes': b'not an image at all', 'path': None}
    (tmp_path / 'bad' / 'data').mkdir(parents=True)
    for split in ('train', 'validation'):
        datasets.Dataset.from_list(rows, features=features).to_parquet(
            str(tmp_path / 'bad' / 'data' / f'{split}-00000-of-00001.parquet'))
    from timm.data import create_dataset
    ds = ReadableImageDataset(create_dataset(f'hfds/{tmp_path / "bad"}', split='train'))
    labels = [ds[i][1] for i in range(4)]
    assert labels == [rows[0]['label'], -2, -3, rows[3]['label']]
    assert ds.filename(1) == 'cut.png' and ds.filename(2) == 'train[#2]'
    assert 'not an image' in ds.read_error(2) and ds.read_error(0) is None


def _bad_cases(digits, hfds_dir, wds_dir, tmp_path):
    cut = tmp_path / 'cut'
    shutil.copytree(wds_dir, cut)
    shard = cut / 'digits-train-0002.tar'
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    nosize = tmp_path / 'nosize'
    nosize.mkdir()
    for f in wds_dir.glob('*.tar'):
        (nosize / f.name).symlink_to(f)
    shutil.copytree(hfds_dir, tmp_path / 'hf' / 'fresh')  # never prepared: its streamed size is unknown
    noval = tmp_path / 'noval'
    shutil.copytree(digits / 'train', noval / 'train')
    return {
        'unknown prefix': (['--data-dir', str(digits), '--dataset', 'hdfs/digits'], ["unknown prefix 'hdfs/'"]),
        'bare prefix': (['--data-dir', str(digits), '--dataset', 'wds'], ['wds/NAME']),
        'folder without its val split': (['--data-dir', str(noval)], ["no 'validation' split", 'val/']),
        'hfds split that is not there': (['--data-dir', str(hfds_dir.parent), '--dataset', 'hfds/digits',
                                          '--val-split', 'test'], ["split 'test'", 'Unknown split']),
        'hfds name that is not there': (['--data-dir', str(hfds_dir.parent), '--dataset', 'hfds/nonexistent-zz'],
                                        ['--dataset hfds/nonexistent-zz']),
        'wds split not in _info.json': (['--data-dir', str(wds_dir), '--dataset', 'wds/digits', '--val-split',
                                         'test'], ["split 'test'"]),
        'shard pattern matching nothing': (['--data-dir', str(wds_dir), '--dataset', 'wds/digits', '--train-split',
                                            'other-{0000..0003}.tar|240'], ['matches no shard', 'other-0000.tar']),
        'shard cut in half': (['--data-dir', str(cut), '--dataset', 'wds/digits'],
                              ['digits-train-0002.tar: shard is cut short']),
        'wds without a size': (['--data-dir', str(nosize), '--dataset', 'wds/digits', '--train-split',
                                'digits-train-{0000..0003}.tar', '--val-split', 'digits-validation-0000.tar'],
                               ['give --train-num-samples']),
        'hfids without a size': (['--data-dir', str(tmp_path / 'hf'), '--dataset', 'hfids/fresh'],
                                 ['give --train-num-samples']),
        'wds without classes': (['--data-dir', str(nosize), '--dataset', 'wds/digits', '--train-split',
                                 'digits-train-{0000..0003}.tar|240', '--val-split', 'digits-validation-0000.tar'],
                                ['give --num-classes']),
        'too few shards for the workers': (['--data-dir', str(wds_dir), '--dataset', 'wds/digits', '--workers', '5',
                                            '--num-classes', '10'],
                                           ['4 shard(s) cannot feed 1 rank(s) x 5 loader worker(s)']),
        'torch set not downloaded': (['--data-dir', str(tmp_path / 'tv'), '--dataset', 'torch/mnist'],
                                     ['--dataset-download']),
        'tfds without its package': (['--data-dir', str(tmp_path), '--dataset', 'tfds/mnist'],
                                     ['pip install tensorflow-datasets']),
    }


CASES = ['unknown prefix', 'bare prefix', 'folder without its val split', 'hfds split that is not there',
         'hfds name that is not there', 'wds split not in _info.json', 'shard pattern matching nothing',
         'shard cut in half', 'wds without a size', 'hfids without a size', 'wds without classes',
         'too few shards for the workers', 'torch set not downloaded'] + \
    (['tfds without its package'] if importlib.util.find_spec('tensorflow_datasets') is None else [])


def test_bad_datasets_are_one_line_and_leave_nothing(digits, hfds_dir, wds_dir, tmp_path, capsys):
    (tmp_path / 'tv').mkdir()
    cases = _bad_cases(digits, hfds_dir, wds_dir, tmp_path)
    assert set(CASES) <= set(cases)
    for name in CASES:
        flags, expected = cases[name]
        out = tmp_path / f'out-{name.replace(" ", "-")}'
        cli_fails(capsys, ['train', *RUN, *flags, '--output', str(out)], *expected)
        assert not out.exists(), name
    with pytest.raises(DataError, match='--num-classes 3: the dataset has 10 classes'):
        resolve_splits(_args(digits, tmp_path, '--num-classes', '3'))


def test_epoch_time_by_layout(digits, hfds_dir, wds_dir, tmp_path, capsys):
    """Measured, not asserted: one training-loader epoch (read, decode, augment, collate) of the same 240
    images through each layout, in this process, as a ratio to the folder's."""
    layouts = {'folder': (digits, []), 'hfds': (hfds_dir.parent, ['--dataset', 'hfds/digits']),
               'wds': (wds_dir, ['--dataset', 'wds/digits', '--num-classes', '10'])}
    times = {}
    for name, (data_dir, extra) in layouts.items():
        loader = create_loaders(_args(data_dir, tmp_path, *extra), DATA_CONFIG)[0]
        best = float('inf')
        for epoch in range(3):
            loader.set_epoch(epoch, 0)
            t0 = time.perf_counter()
            n = sum(len(y) for _, y in loader)
            best = min(best, time.perf_counter() - t0)
        assert n == 240
        times[name] = best
    with capsys.disabled():
        print('\nloader epoch, 240 digits images: ' + ', '.join(
            f'{k} {v * 1e3:.0f} ms ({v / times["folder"]:.2f}x)' for k, v in times.items()))


def test_input_and_target_keys_name_other_columns(tmp_path):
    """timm's --input-key / --target-key: a parquet set whose columns are not image / label trains through them;
    on a folder they are one line."""
    features = datasets.Features({'photo': datasets.Image(), 'digit': datasets.Value('int64')})
    (tmp_path / 'keyed' / 'data').mkdir(parents=True)
    rows = [{'photo': {'bytes': _png(k), 'path': None}, 'digit': k % 4} for k in range(16)]
    for split in ('train', 'validation'):
        datasets.Dataset.from_list(rows, features=features).to_parquet(
            str(tmp_path / 'keyed' / 'data' / f'{split}-00000-of-00001.parquet'))
    data = ['--data-dir', str(tmp_path), '--dataset', 'hfds/keyed', '--num-classes', '4', '--batch-size', '8']
    args = build_parser().parse_args([*RUN, *data, '--input-key', 'photo', '--target-key', 'digit'])
    train_loader, val_loader, _ = create_loaders(args, DATA_CONFIG, rank=0, world_size=1)
    assert sorted(v for _, y in val_loader for v in y.tolist()) == sorted(r['digit'] for r in rows)
    x, _ = next(iter(train_loader))
    assert x.shape[1:] == DATA_CONFIG["input_size"]
    folder = build_parser().parse_args([*RUN, '--data-dir', str(tmp_path), '--input-key', 'photo'])
    with pytest.raises(DataError, match='--input-key / --target-key apply to hfds/'):
        create_loaders(folder, DATA_CONFIG, rank=0, world_size=1)
