"""convert/: TF checkpoint -> timm safetensors, on checkpoints the tests write with the release's names.

The fixtures come from TF's own recipe (convert.tf_fixture: block-argument strings, round_filters), not
from the timm-derived name map under test; Keras's EfficientNet checks the numbers.
"""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `convert` is a folder of scripts beside the package, not installed

from advprop_zoo import VARIANTS  # noqa: E402
from advprop_zoo.dual_bn import to_dual_bn  # noqa: E402
from convert.tf_checkpoint import safe_extract  # noqa: E402
from convert.tf_fixture import release_shapes, release_tensors, write_checkpoint, write_release_tarball  # noqa: E402
from convert.tf_names import tf_name_map, tf_to_timm_layout  # noqa: E402
from convert.tf_to_timm import _aux_bns, _expected, convert, main  # noqa: E402

EMA = '/ExponentialMovingAverage'


def run(capsys, *args):
    """main() in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('tf_to_timm.py: error: '), err
    assert 'Traceback' not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def assert_nothing_written(folder: Path):
    assert [p.name for p in folder.iterdir()] == [], list(folder.iterdir())


# ---------------------------------------------------------------------------------------------------
# fixtures (module scope: each checkpoint is written once)

@pytest.fixture(scope='module')
def b0_release(tmp_path_factory):
    """B0 like the release: EMA twins, raw weights, RMSProp slots, global_step; as tarball and prefix."""
    root = tmp_path_factory.mktemp('b0')
    tensors = release_tensors(0)
    tarball = write_release_tarball(root / 'efficientnet-b0.tar.gz', 0, tensors)
    prefix = write_checkpoint(root / 'ckpt' / 'model.ckpt', tensors)
    return dict(tensors=tensors, tarball=tarball, prefix=prefix)


@pytest.fixture(scope='module')
def b0_ema():
    """B0 EMA twins only: the cheap base the bad-input checkpoints are edited from."""
    return release_tensors(0, raw=False, slots=(), global_step=False)


@pytest.fixture
def out(tmp_path):
    folder = tmp_path / 'out'
    folder.mkdir()
    return folder


def tf_value(tensors, model_name, key, ema=True):
    """The TF array behind a timm key, in timm's layout (found through the name map under test)."""
    level = int(model_name.split('_b')[1][0])
    entry = next(e for e in _expected(model_name) if e.timm_key == key)
    name = f'efficientnet-b{level}/{entry.tf_name}' + (EMA if ema else '')
    return torch.from_numpy(tf_to_timm_layout(tensors[name], entry.layout))


# ---------------------------------------------------------------------------------------------------
# the name map

@pytest.mark.parametrize('variant', VARIANTS, ids=lambda v: v.name)
def test_name_map_covers_every_variant(variant, reference):
    with torch.device('meta'):
        model = timm.create_model(variant.name)
    entries = tf_name_map(model)
    # expected count from the model's structure: stem conv + BN, per block [expand conv + BN] + depthwise
    # conv + BN + SE (2 kernels, 2 biases) + projection conv + BN, head conv + BN, dense kernel + bias
    blocks = [b for stage in model.blocks for b in stage]
    expanding = sum(hasattr(b, 'conv_pwl') for b in blocks)
    assert len(entries) == 5 + 5 * expanding + 14 * len(blocks) + 5 + 2
    assert len(blocks) == reference['models'][variant.level]['tf_blocks']
    # names and shapes equal those built from TF's own block arguments (independent of timm)
    assert {e.tf_name: e.tf_shape for e in entries} == release_shapes(variant.level)
    # every model tensor exactly once; only BN step counters have no TF variable
    keys = [e.timm_key for e in entries]
    assert len(keys) == len(set(keys))
    assert set(model.state_dict()) - set(keys) == {k for k in model.state_dict() if k.endswith('num_batches_tracked')}
    assert sum(int(np.prod(e.shape)) for e in entries if 'running' not in e.timm_key) == \
        reference['models'][variant.level]['params']


def test_name_shift_in_expand_ratio_1_blocks():
    names = {e.timm_key: e.tf_name for e in _expected('efficientnet_b0_advprop')}
    assert names['blocks.0.0.conv_pw.weight'] == 'blocks_0/conv2d/kernel'  # no expansion: projection is conv2d
    assert names['blocks.0.0.bn2.weight'] == 'blocks_0/tpu_batch_normalization_1/gamma'
    assert names['blocks.1.0.conv_pw.weight'] == 'blocks_1/conv2d/kernel'  # expansion conv
    assert names['blocks.1.0.conv_pwl.weight'] == 'blocks_1/conv2d_1/kernel'
    assert names['blocks.1.0.bn3.running_var'] == 'blocks_1/tpu_batch_normalization_2/moving_variance'
    assert names['blocks.1.0.se.conv_expand.bias'] == 'blocks_1/se/conv2d_1/bias'
    assert names['classifier.weight'] == 'head/dense/kernel'


# ---------------------------------------------------------------------------------------------------
# conversions that work

def test_release_tarball_converts_verifies_and_loads(capsys, b0_release, out):
    target = out / 'model.safetensors'
    code, stdout, err = run(capsys, '--checkpoint', b0_release['tarball'], '--model', 'efficientnet_b0_advprop',
                            '--output', target, '--verify', '--config')
    assert code == 0, err
    assert 'EMA twins' in stdout and 'auxiliary BNs: none found' in stdout
    assert 'top-1 agreement 2/2' in stdout and 'max |Δlogit|' in stdout
    sd = load_file(str(target))
    for name in ('efficientnet_b0_advprop', 'tf_efficientnet_b0'):
        timm.create_model(name).load_state_dict(sd, strict=True)
    for key in ('conv_stem.weight', 'blocks.1.0.conv_dw.weight', 'blocks.0.0.se.conv_reduce.bias',
                'bn2.running_var', 'classifier.weight'):
        assert torch.equal(sd[key], tf_value(b0_release['tensors'], 'efficientnet_b0_advprop', key)), key
    with safe_open(str(target), 'pt') as f:
        meta = f.metadata()
    assert json.loads(meta['source_sha256']) == {
        'efficientnet-b0.tar.gz': hashlib.sha256(b0_release['tarball'].read_bytes()).hexdigest()}
    assert meta['variant'] == 'efficientnet_b0_advprop' and meta['ema'] == 'true' and meta['aux_bns'] == '0'
    assert meta['converter'].startswith('advprop-zoo convert/tf_to_timm.py ')
    assert json.loads((out / 'config.json').read_text())['architecture'] == 'efficientnet_b0_advprop'
    model = timm.create_model(f'local-dir:{out}', pretrained=True)  # timm's own loader, config + weights
    assert tuple(model.pretrained_cfg['mean']) == (0.5, 0.5, 0.5)
    assert sorted(p.name for p in out.iterdir()) == ['config.json', 'model.safetensors']  # no temp files left


def test_conversion_says_where_its_time_went(b0_release, out):
    result = convert(b0_release['prefix'], out / 'b0.safetensors')
    assert list(result.phases) == ['open', 'structure', 'read+write', 'source hash wait', 'fsync+rename', 'close']
    assert min(result.phases.values()) >= 0
    assert sum(result.phases.values()) == pytest.approx(result.seconds, abs=1e-3)  # the laps cover the whole call
    assert result.hash_seconds > 0  # the source hash ran, on its own thread


def test_no_ema_converts_the_raw_weights(capsys, b0_release, out):
    target = out / 'raw.safetensors'
    code, stdout, _ = run(capsys, '--checkpoint', b0_release['prefix'], '--output', target, '--no-ema')
    assert code == 0 and 'raw weights' in stdout
    sd = load_file(str(target))
    key = 'blocks.2.1.conv_pwl.weight'
    assert torch.equal(sd[key], tf_value(b0_release['tensors'], 'efficientnet_b0_advprop', key, ema=False))
    with safe_open(str(target), 'pt') as f:
        meta = f.metadata()
    assert meta['ema'] == 'false' and set(json.loads(meta['source_sha256'])) == {
        'model.ckpt.index', 'model.ckpt.data-00000-of-00001'}


def test_checkpoint_without_ema_twins_falls_back_to_raw(capsys, tmp_path, out):
    tensors = release_tensors(0, ema=False, slots=())
    folder = tmp_path / 'raw'
    write_checkpoint(folder / 'model.ckpt', tensors)
    code, stdout, _ = run(capsys, '--checkpoint', folder, '--output', out / 'b0.safetensors',
                          '--model', 'tf_efficientnet_b0.aa_in1k', '--config')
    assert code == 0 and 'raw weights' in stdout
    timm.create_model('tf_efficientnet_b0').load_state_dict(load_file(str(out / 'b0.safetensors')), strict=True)
    config = json.loads((out / 'config.json').read_text())
    assert config['pretrained_cfg']['mean'] == [0.485, 0.456, 0.406]  # the tag's cfg decides mean/std


def test_larger_variant_inferred_from_scope_and_verified(capsys, tmp_path, out):
    """B3 (width 1.2, depth 1.4) with EMA copies only, as NoisyStudent ships them; --model left out."""
    tensors = release_tensors(3, raw=False, slots=())
    prefix = write_checkpoint(tmp_path / 'b3' / 'model.ckpt', tensors)
    code, stdout, err = run(capsys, '--checkpoint', prefix, '--output', out / '{model}.safetensors', '--verify')
    assert code == 0, err
    assert '-> efficientnet_b3_advprop' in stdout and 'top-1 agreement 2/2' in stdout
    sd = load_file(str(out / 'efficientnet_b3_advprop.safetensors'))
    timm.create_model('tf_efficientnet_b3').load_state_dict(sd, strict=True)
    key = 'blocks.5.3.conv_dw.weight'
    assert torch.equal(sd[key], tf_value(tensors, 'efficientnet_b3_advprop', key))


@pytest.fixture(scope='module')
def aux_conversion(tmp_path_factory):
    """B0 with an auxiliary BN beside every BN, numbered after the main BNs of its scope."""
    tmp = tmp_path_factory.mktemp('aux')
    tensors = release_tensors(0, raw=False, slots=(), aux_bn=True)
    prefix = write_checkpoint(tmp / 'ckpt' / 'model.ckpt', tensors)
    result = convert(prefix, tmp / 'b0.safetensors')
    return tensors, result, load_file(str(tmp / 'b0.safetensors'))


def test_auxiliary_bns_become_dual_bn_keys(aux_conversion):
    tensors, result, sd = aux_conversion
    n_bn = sum(1 for e in _expected('efficientnet_b0_advprop') if e.timm_key.endswith('running_var'))
    assert result.aux_bns == n_bn and f'auxiliary BNs: {n_bn} found' in '\n'.join(result.lines())
    aux = tensors['efficientnet-b0/blocks_1/tpu_batch_normalization_5/moving_variance' + EMA]
    assert np.array_equal(sd['blocks.1.0.bn3.aux_bn.0.running_var'].numpy(), aux)
    assert np.array_equal(sd['bn1.aux_bn.0.weight'].numpy(), tensors['efficientnet-b0/stem/tpu_batch_normalization_1/gamma' + EMA])
    main_keys = {k: v for k, v in sd.items() if '.aux_bn.' not in k}
    timm.create_model('efficientnet_b0_advprop').load_state_dict(main_keys, strict=True)


def test_auxiliary_bns_load_into_the_dual_bn_model(aux_conversion):
    model = to_dual_bn(timm.create_model('efficientnet_b0_advprop'))
    model.load_state_dict(aux_conversion[2], strict=True)


def test_auxiliary_bns_named_with_an_aux_marker():
    expected = _expected('efficientnet_b0_advprop')
    group = {f'blocks_1/aux_bn/tpu_batch_normalization_1/{v}': (96,)
             for v in ('gamma', 'beta', 'moving_mean', 'moving_variance')}
    assert _aux_bns(group, expected) == {'blocks_1/aux_bn/tpu_batch_normalization_1': 'blocks.1.0.bn2'}
    wrong_width = {k: (97,) for k in group}
    assert _aux_bns(wrong_width, expected) == {}


def test_batch_mode_converts_every_tarball_and_tabulates(capsys, tmp_path, b0_release):
    folder = tmp_path / 'tarballs'
    folder.mkdir()
    os.link(b0_release['tarball'], folder / 'efficientnet-b0.tar.gz')
    _hostile_tarball(folder / 'efficientnet-b9.tar.gz', 'symlink')
    code, stdout, err = run(capsys, '--batch', folder, '--output', tmp_path / 'zoo')
    assert code == 1 and '1 of 2 tarballs failed' in err
    assert 'converting' in err  # the progress bar
    rows = [line for line in stdout.splitlines() if line.startswith('| efficientnet-b')]
    assert len(rows) == 2 and 'efficientnet_b0_advprop' in rows[0] and 'FAILED' in rows[1]
    assert (tmp_path / 'zoo' / 'efficientnet_b0_advprop' / 'model.safetensors').is_file()


# ---------------------------------------------------------------------------------------------------
# bad inputs: one line on stderr, exit 1, nothing written

def _edited(tmp_path, tensors, edit=None):
    tensors = dict(tensors)
    if edit:
        edit(tensors)
    return write_checkpoint(tmp_path / 'bad' / 'model.ckpt', tensors)


def test_truncated_data_file(capsys, tmp_path, b0_ema, out):
    prefix = _edited(tmp_path, b0_ema)
    data = Path(f'{prefix}.data-00000-of-00001')
    data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
    code, _, err = run(capsys, '--checkpoint', prefix, '--output', out / 'x.safetensors')
    assert_one_line_error(code, err, 'truncated')
    assert_nothing_written(out)


def test_missing_index(capsys, tmp_path, b0_ema, out):
    prefix = _edited(tmp_path, b0_ema)
    Path(f'{prefix}.index').unlink()
    code, _, err = run(capsys, '--checkpoint', prefix, '--output', out / 'x.safetensors')
    assert_one_line_error(code, err, 'model.ckpt.index')
    assert_nothing_written(out)


def test_wrong_model_says_what_it_looks_like(capsys, b0_release, out):
    code, _, err = run(capsys, '--checkpoint', b0_release['prefix'], '--model', 'efficientnet_b3_advprop',
                       '--output', out / 'x.safetensors')
    assert_one_line_error(code, err, 'does not fit efficientnet_b3_advprop', 'mis-shaped',
                          'this looks like efficientnet-b0')
    assert_nothing_written(out)


def test_unknown_model_name(capsys, b0_release, out):
    code, _, err = run(capsys, '--checkpoint', b0_release['prefix'], '--model', 'efficientnet_b0_advprp',
                       '--output', out / 'x.safetensors')
    assert_one_line_error(code, err, "did you mean 'efficientnet_b0_advprop'")
    code, _, err = run(capsys, '--checkpoint', b0_release['prefix'], '--model', 'resnet50',
                       '--output', out / 'x.safetensors')
    assert_one_line_error(code, err, 'B-series EfficientNets only')
    assert_nothing_written(out)


def test_missing_variable(capsys, tmp_path, b0_ema, out):
    name = 'efficientnet-b0/blocks_4/se/conv2d_1/bias' + EMA
    prefix = _edited(tmp_path, b0_ema, lambda t: t.pop(name))
    code, _, err = run(capsys, '--checkpoint', prefix, '--model', 'efficientnet_b0_advprop',
                       '--output', out / 'x.safetensors')
    assert_one_line_error(code, err, '1 missing: blocks_4/se/conv2d_1/bias')
    assert_nothing_written(out)


def test_extra_variable(capsys, tmp_path, b0_ema, out):
    extra = {'efficientnet-b0/blocks_4/extra_conv/kernel' + EMA: np.zeros((1, 1, 8, 8), np.float32)}
    prefix = _edited(tmp_path, b0_ema, lambda t: t.update(extra))
    code, _, err = run(capsys, '--checkpoint', prefix, '--output', out / 'x.safetensors')
    assert_one_line_error(code, err, '1 unexpected: blocks_4/extra_conv/kernel')
    assert_nothing_written(out)


def test_nan_weights(capsys, tmp_path, b0_ema, out):
    name = 'efficientnet-b0/blocks_2/depthwise_conv2d/depthwise_kernel' + EMA

    def poison(t):
        t[name] = t[name].copy()
        t[name].flat[7] = np.nan
    prefix = _edited(tmp_path, b0_ema, poison)
    code, _, err = run(capsys, '--checkpoint', prefix, '--output', out / 'x.safetensors')
    assert_one_line_error(code, err, 'blocks_2/depthwise_conv2d/depthwise_kernel', '1 NaN/Inf')
    assert_nothing_written(out)


def test_partial_ema_twins_refused(capsys, tmp_path, b0_ema, out):
    name = 'efficientnet-b0/head/conv2d/kernel'

    def half(t):
        t[name] = t.pop(name + EMA)
    prefix = _edited(tmp_path, b0_ema, half)
    code, _, err = run(capsys, '--checkpoint', prefix, '--output', out / 'x.safetensors')
    assert_one_line_error(code, err, 'no EMA twin', '--no-ema')
    assert_nothing_written(out)


def _hostile_tarball(path: Path, kind: str) -> Path:
    with tarfile.open(path, 'w:gz') as tar:
        def add(info, data=b''):
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
        add(tarfile.TarInfo('efficientnet-b0/checkpoint'), b'model_checkpoint_path: "model.ckpt"\n')
        if kind == 'dotdot':
            add(tarfile.TarInfo('efficientnet-b0/../../escaped.txt'), b'pwned')
        elif kind == 'absolute':
            add(tarfile.TarInfo(str(path.parent / 'escaped.txt')), b'pwned')
        elif kind in ('symlink', 'hardlink'):
            info = tarfile.TarInfo('efficientnet-b0/model.ckpt.index')
            info.type = tarfile.SYMTYPE if kind == 'symlink' else tarfile.LNKTYPE
            info.linkname = '/etc/passwd'
            add(info)
        elif kind == 'device':
            info = tarfile.TarInfo('efficientnet-b0/null')
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            add(info)
    return path


@pytest.mark.parametrize('kind,needle', [('dotdot', 'climbs out'), ('absolute', 'absolute path'),
                                         ('symlink', 'is a link'), ('hardlink', 'is a link'),
                                         ('device', 'device')])
def test_hostile_tarball(capsys, tmp_path, out, kind, needle):
    tarball = _hostile_tarball(tmp_path / 'efficientnet-b0.tar.gz', kind)
    code, _, err = run(capsys, '--checkpoint', tarball, '--output', out / 'x.safetensors')
    assert_one_line_error(code, err, 'refused', needle)
    assert_nothing_written(out)
    assert not (tmp_path / 'escaped.txt').exists() and not (tmp_path.parent / 'escaped.txt').exists()


def test_safe_extract_writes_nothing_outside(tmp_path):
    dest = tmp_path / 'dest'
    dest.mkdir()
    tarball = _hostile_tarball(tmp_path / 'bad.tar.gz', 'dotdot')
    with pytest.raises(Exception, match='climbs out'):
        safe_extract(tarball, dest)
    assert not (tmp_path / 'escaped.txt').exists()


def test_truncated_tarball(capsys, tmp_path, b0_release, out):
    tarball = tmp_path / 'efficientnet-b0.tar.gz'
    tarball.write_bytes(b0_release['tarball'].read_bytes()[:100_000])
    code, _, err = run(capsys, '--checkpoint', tarball, '--output', out / 'x.safetensors')
    assert_one_line_error(code, err, 'cannot unpack')
    assert_nothing_written(out)


def test_tarball_without_a_checkpoint_is_named_as_given(capsys, tmp_path, out):
    """The message names the tarball the user gave, not the temp folder it was unpacked into (gone by then)."""
    tarball = tmp_path / 'efficientnet-b0.tar.gz'
    with tarfile.open(tarball, 'w:gz') as tar:
        info = tarfile.TarInfo('efficientnet-b0/README.txt')
        info.size = 5
        tar.addfile(info, io.BytesIO(b'hello'))
    code, _, err = run(capsys, '--checkpoint', tarball, '--output', out / 'x.safetensors')
    line = assert_one_line_error(code, err, str(tarball), 'no TF checkpoint in this tarball')
    assert 'advprop-zoo-tf-' not in line
    assert_nothing_written(out)


def test_unwritable_output(capsys, tmp_path, b0_release):
    not_a_folder = tmp_path / 'file'
    not_a_folder.write_text('x')
    code, _, err = run(capsys, '--checkpoint', b0_release['prefix'], '--output', not_a_folder / 'x.safetensors')
    assert_one_line_error(code, err, 'does not exist')
    code, _, err = run(capsys, '--checkpoint', b0_release['prefix'], '--output', tmp_path / 'nope' / 'x.safetensors')
    assert_one_line_error(code, err, 'does not exist')
    assert not (tmp_path / 'nope').exists()
    if os.geteuid() != 0:  # root writes into read-only folders
        locked = tmp_path / 'locked'
        locked.mkdir(mode=0o500)
        code, _, err = run(capsys, '--checkpoint', b0_release['prefix'], '--output', locked / 'x.safetensors')
        assert_one_line_error(code, err, 'cannot write')


def test_existing_output_needs_force(capsys, b0_release, out):
    target = out / 'b0.safetensors'
    target.write_bytes(b'precious')
    code, _, err = run(capsys, '--checkpoint', b0_release['prefix'], '--output', target)
    assert_one_line_error(code, err, 'output exists', '--force')
    assert target.read_bytes() == b'precious' and len(list(out.iterdir())) == 1
    code, _, _ = run(capsys, '--checkpoint', b0_release['prefix'], '--output', target, '--force')
    assert code == 0 and load_file(str(target))['conv_stem.weight'].shape == (32, 3, 3, 3)


def test_script_help_and_error_from_a_shell(tmp_path):
    script = ROOT / 'convert' / 'tf_to_timm.py'
    r = subprocess.run([sys.executable, str(script), '--help'], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and '--checkpoint' in r.stdout and '--no-ema' in r.stdout and '--batch' in r.stdout
    r = subprocess.run([sys.executable, str(script), '--checkpoint', str(tmp_path / 'missing' / 'model.ckpt'),
                        '--output', str(tmp_path / 'x.safetensors')], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == ''
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and 'missing checkpoint index' in r.stderr
    assert not (tmp_path / 'x.safetensors').exists()
