"""Loading pretrained weights the timm way: Hub cache (offline), file=, local-dir:, and every bad input."""
import argparse
import json
import os
import pickle
import re

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from advprop_zoo import WeightsError, load_weights, save_weights
from conftest import cli_fails, random_state_dict


@pytest.fixture(scope='module')
def b0_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp('w') / 'b0.safetensors'
    model = timm.create_model('efficientnet_b0_advprop')
    save_file(random_state_dict(model), str(path))
    return path


def _assert_loaded(model, path, skip=()):
    expected = load_file(str(path))
    got = model.state_dict()
    for k, v in expected.items():
        if k not in skip:
            assert torch.equal(got[k], v), k


def test_pretrained_from_offline_hub_cache(hub_cache, b0_weights):
    hub_cache('timm/tf_efficientnet_b0.ap_in1k', 'model.safetensors', b0_weights.read_bytes())
    model = timm.create_model('efficientnet_b0_advprop', pretrained=True)
    _assert_loaded(model, b0_weights)


def test_pretrained_zoo_tag_from_offline_hub_cache(hub_cache, b0_weights):
    hub_cache('advprop-zoo/efficientnet_b0_advprop.ap_in1k_zoo', 'model.safetensors', b0_weights.read_bytes())
    _assert_loaded(timm.create_model('efficientnet_b0_advprop.ap_in1k_zoo', pretrained=True), b0_weights)


def test_pretrained_from_file_overlay(b0_weights):
    model = timm.create_model('efficientnet_b0_advprop', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(b0_weights)))
    _assert_loaded(model, b0_weights)


def test_pretrained_with_fresh_head_keeps_body(b0_weights):
    model = timm.create_model('efficientnet_b0_advprop', pretrained=True, num_classes=7,
                              pretrained_cfg_overlay=dict(file=str(b0_weights)))
    assert model.classifier.out_features == 7
    _assert_loaded(model, b0_weights, skip={'classifier.weight', 'classifier.bias'})


def test_pretrained_features_only(b0_weights):
    model = timm.create_model('efficientnet_b0_advprop', pretrained=True, features_only=True,
                              pretrained_cfg_overlay=dict(file=str(b0_weights)))
    assert torch.equal(model.conv_stem.weight, load_file(str(b0_weights))['conv_stem.weight'])


def test_local_dir_round_trip(tmp_path, b0_weights):
    source = timm.create_model('efficientnet_b0_advprop')
    source.load_state_dict(load_file(str(b0_weights)))
    timm.models.save_for_hf(source, tmp_path / 'repo')  # timm's own Hub layout: config.json + model.safetensors
    config = json.loads((tmp_path / 'repo' / 'config.json').read_text())
    assert config['architecture'] == 'efficientnet_b0_advprop'
    assert config['pretrained_cfg']['mean'] == [0.5, 0.5, 0.5]
    model = timm.create_model(f'local-dir:{tmp_path / "repo"}', pretrained=True)
    _assert_loaded(model, b0_weights)
    assert model.pretrained_cfg['crop_pct'] == source.pretrained_cfg['crop_pct']


def test_offline_without_cache_names_repo_file_and_remedy(hub_cache):
    with pytest.raises(WeightsError) as e:
        timm.create_model('efficientnet_b2_advprop', pretrained=True)
    msg = str(e.value)
    assert 'timm/tf_efficientnet_b2.ap_in1k/model.safetensors' in msg
    assert 'HF_HUB_OFFLINE' in msg and "pretrained_cfg_overlay=dict(file=" in msg


def test_truncated_safetensors(tmp_path, b0_weights):
    bad = tmp_path / 'cut.safetensors'
    bad.write_bytes(b0_weights.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match='truncated'):
        timm.create_model('efficientnet_b0_advprop', pretrained=True, pretrained_cfg_overlay=dict(file=str(bad)))


def test_truncated_file_in_hub_cache(hub_cache, b0_weights):
    hub_cache('timm/tf_efficientnet_b0.ap_in1k', 'model.safetensors', b0_weights.read_bytes()[:5000])
    with pytest.raises(WeightsError, match='truncated'):
        timm.create_model('efficientnet_b0_advprop', pretrained=True)


@pytest.mark.parametrize('data', [b'', b'\x01\x00', b'\xff' * 64, (20).to_bytes(8, 'little') + b'{not json' + b' ' * 11])
def test_corrupt_safetensors(tmp_path, data):
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes(data)
    with pytest.raises(WeightsError, match='bad.safetensors'):
        load_weights(bad)


def test_shape_mismatch_names_first_key_and_both_shapes(tmp_path):
    path = tmp_path / 'b1.safetensors'
    save_file(random_state_dict(timm.create_model('efficientnet_b2_advprop')), str(path))
    with pytest.raises(WeightsError) as e:
        timm.create_model('efficientnet_b0_advprop', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert "'conv_stem.weight'" in str(e.value) or 'shape mismatch' in str(e.value)
    assert 'shape mismatch' in str(e.value) and 'expects' in str(e.value)


def test_shape_mismatch_first_key_exact(tmp_path, b0_weights):
    sd = load_file(str(b0_weights))
    sd['blocks.1.0.conv_pw.weight'] = torch.zeros(1, 2, 1, 1)
    path = tmp_path / 'x.safetensors'
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match=r"'blocks\.1\.0\.conv_pw\.weight'.*\(1, 2, 1, 1\).*\(96, 16, 1, 1\)"):
        timm.create_model('efficientnet_b0_advprop', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_missing_and_unexpected_keys(tmp_path, b0_weights):
    sd = load_file(str(b0_weights))
    sd.pop('bn2.weight')
    save_file(sd, str(tmp_path / 'm.safetensors'))
    with pytest.raises(WeightsError, match="lack 'bn2.weight'"):
        timm.create_model('efficientnet_b0_advprop', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'm.safetensors')))
    sd = load_file(str(b0_weights))
    sd['extra.weight'] = torch.zeros(1)
    save_file(sd, str(tmp_path / 'u.safetensors'))
    with pytest.raises(WeightsError, match="'extra.weight'"):
        timm.create_model('efficientnet_b0_advprop', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'u.safetensors')))


def test_missing_file_and_empty_local_dir(tmp_path):
    with pytest.raises(WeightsError, match='no such weights file'):
        timm.create_model('efficientnet_b0_advprop', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'nope.safetensors')))
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'config.json').write_text(json.dumps(
        {'architecture': 'efficientnet_b0_advprop', 'num_classes': 1000, 'pretrained_cfg': {}}))
    with pytest.raises(WeightsError, match='no weights file'):
        timm.create_model(f'local-dir:{tmp_path / "empty"}', pretrained=True)


class _Payload:
    def __reduce__(self):
        return (os.system, (f'touch {self.sentinel}',))


def test_pickle_is_loaded_weights_only(tmp_path, b0_weights):
    safe = tmp_path / 'plain.pth'
    torch.save({'state_dict': load_file(str(b0_weights))}, safe)
    _assert_loaded(timm.create_model('efficientnet_b0_advprop', pretrained=True,
                                     pretrained_cfg_overlay=dict(file=str(safe))), b0_weights)

    sentinel = tmp_path / 'pwned'
    _Payload.sentinel = sentinel
    hostile = tmp_path / 'hostile.pth'
    with open(hostile, 'wb') as f:
        pickle.dump({'conv_stem.weight': _Payload()}, f)
    with pytest.raises(WeightsError, match='refused|Weights only|unpickl'):
        timm.create_model('efficientnet_b0_advprop', pretrained=True, pretrained_cfg_overlay=dict(file=str(hostile)))
    with pytest.raises(WeightsError, match='refused to unpickle'):
        load_weights(hostile)
    assert not sentinel.exists()


def test_save_weights_is_atomic(tmp_path, b0_weights, monkeypatch):
    target = tmp_path / 'out.safetensors'
    sd = load_file(str(b0_weights))
    save_weights(sd, target, metadata={'variant': 'b0'})
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError('disk full')
    monkeypatch.setattr(os, 'fsync', boom)
    with pytest.raises(OSError, match='disk full'):
        save_weights({k: v * 2 for k, v in sd.items()}, target)
    assert target.read_bytes() == before  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ['out.safetensors']  # no temp file left behind
    with pytest.raises(WeightsError, match='does not exist'):
        save_weights(sd, tmp_path / 'no' / 'dir' / 'x.safetensors')


def _rewrite_header(src, dst, edit):
    """Copy a safetensors file with its JSON header changed by ``edit`` (the data bytes left as they are)."""
    import struct
    raw = src.read_bytes()
    (n,) = struct.unpack('<Q', raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    dst.write_bytes(struct.pack('<Q', len(text)) + text + raw[8 + n:])
    return dst


@pytest.mark.parametrize('edit, expected', [
    (lambda h: h['conv_stem.weight'].update(dtype='F99'), "unknown dtype 'F99'"),
    (lambda h: h['conv_stem.weight'].update(shape=[16, 3, 3, 3]), 'data offsets span'),
    (lambda h: h['conv_stem.weight'].update(dtype='F16'), 'data offsets span'),
    (lambda h: h['bn1.weight'].update(data_offsets=[0, h['bn1.weight']['data_offsets'][1]
                                                    - h['bn1.weight']['data_offsets'][0]]), 'data offsets span|overlap'),
    (lambda h: h['conv_stem.weight'].update(shape=[-32, 3, 3, 3]), 'corrupt safetensors header entry'),
])
def test_header_that_lies_about_its_tensors_is_refused(tmp_path, capsys, b0_weights, edit, expected):
    """A header whose shape x dtype does not match its offsets, or names an unknown dtype, fails in one line
    before safetensors or timm reads any tensor; fold says so and writes nothing."""
    bad = _rewrite_header(b0_weights, tmp_path / 'bad.safetensors', edit)
    with pytest.raises(WeightsError, match=expected):
        load_weights(bad)
    line = cli_fails(capsys, ['fold', str(bad), str(tmp_path / 'out.safetensors'), '--model', 'efficientnet_b0_advprop'],
                     str(bad))
    assert re.search(expected, line) and sorted(p.name for p in tmp_path.iterdir()) == ['bad.safetensors']


def test_integer_tensor_for_a_float_parameter_is_refused(tmp_path):
    model = timm.create_model('efficientnet_b0_advprop')
    sd = random_state_dict(model)
    sd['conv_stem.weight'] = (sd['conv_stem.weight'] * 100).to(torch.int32)
    path = save_weights(sd, tmp_path / 'int.safetensors')
    with pytest.raises(WeightsError, match="'conv_stem.weight' holds int32 values; .* float32 .*floating-point"):
        timm.create_model('efficientnet_b0_advprop', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_unpublished_zoo_tag_says_how_to_get_the_weights(hub_cache):
    with pytest.raises(WeightsError, match='not yet published on the Hub.*convert/tf_to_timm.py.*hub/publish.py'):
        timm.create_model('efficientnet_b0_advprop.ap_in1k_zoo', pretrained=True)
    with pytest.raises(WeightsError) as e:  # the default tag is timm's, published: no such hint
        timm.create_model('efficientnet_b0_advprop', pretrained=True)
    assert 'not yet published' not in str(e.value)


def _timm_train_checkpoint(path, state_dict, ema=None, args=None, prefix=''):
    """A checkpoint as timm's train.py CheckpointSaver writes it (``*.pth.tar`` / ``model_best.pth.tar``)."""
    params = [v for k, v in state_dict.items() if v.is_floating_point()][:2]
    save = {
        'epoch': 7,
        'arch': 'efficientnet_b0_advprop',
        'state_dict': {prefix + k: v for k, v in state_dict.items()},
        'optimizer': {'state': {0: {'momentum_buffer': torch.zeros_like(params[0])}},
                      'param_groups': [{'lr': 0.1, 'betas': (0.9, 0.999), 'foreach': None, 'params': [0, 1]}]},
        'version': 2,
        'args': args if args is not None else argparse.Namespace(
            model='efficientnet_b0_advprop', lr=0.1, sched='cosine', mean=None, input_size=[3, 224, 224],
            model_kwargs={}, amp=True, drop_path=None, scale=(0.08, 1.0), data_dir='/data/imagenet'),
        'amp_scaler': {'scale': 65536.0, 'growth_factor': 2.0, '_growth_tracker': 3},
        'metric': 76.5,
    }
    if ema is not None:
        save['state_dict_ema'] = {prefix + k: v for k, v in ema.items()}
    torch.save(save, path)
    return path


def test_timm_train_checkpoint_state_dict_by_default_ema_on_request(tmp_path, b0_weights):
    """timm's rule (validate.py --use-ema): state_dict unless use_ema; module. prefixes stripped; the args
    Namespace of plain values is allowed for the load."""
    main = load_file(str(b0_weights))
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in main.items()}
    path = _timm_train_checkpoint(tmp_path / 'model_best.pth.tar', main, ema=ema, prefix='module.')
    got = load_weights(path)
    assert got.keys() == main.keys() and all(torch.equal(got[k], main[k]) for k in main)
    got_ema = load_weights(path, use_ema=True)
    assert got_ema.keys() == main.keys() and all(torch.equal(got_ema[k], ema[k]) for k in main)


def test_use_ema_without_ema_weights_is_one_line(tmp_path, b0_weights):
    plain = _timm_train_checkpoint(tmp_path / 'last.pth.tar', load_file(str(b0_weights)))
    with pytest.raises(WeightsError, match=r'last\.pth\.tar: no EMA weights \(state_dict_ema / model_ema\)'):
        load_weights(plain, use_ema=True)
    with pytest.raises(WeightsError, match='b0.safetensors: a safetensors file holds one state dict, no EMA'):
        load_weights(b0_weights, use_ema=True)
    only_ema = tmp_path / 'ema_only.pth'
    torch.save({'state_dict_ema': load_file(str(b0_weights))}, only_ema)
    with pytest.raises(WeightsError, match='holds only EMA weights .*use_ema=True'):
        load_weights(only_ema)
    assert load_weights(only_ema, use_ema=True).keys() == load_file(str(b0_weights)).keys()


class _Foreign:
    """A class a checkpoint's args may not carry: unpickling it would import and build it."""


def test_foreign_object_in_a_timm_checkpoint_is_refused_without_running_it(tmp_path, b0_weights):
    sd = load_file(str(b0_weights))
    foreign = _timm_train_checkpoint(tmp_path / 'foreign.pth.tar', sd,
                                     args=argparse.Namespace(model='x', opt=_Foreign()))
    with pytest.raises(WeightsError) as e:
        load_weights(foreign)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and '\x1b' not in msg
    assert msg.startswith(f'{foreign}: refused to unpickle: it holds a {__name__}._Foreign object')

    sentinel = tmp_path / 'pwned'
    _Payload.sentinel = sentinel
    code = _timm_train_checkpoint(tmp_path / 'code.pth.tar', sd, args=argparse.Namespace(model='x', hook=_Payload()))
    with pytest.raises(WeightsError, match=r'code\.pth\.tar: refused to unpickle: it holds a (posix|os)\.system'):
        load_weights(code)
    top_level = tmp_path / 'top.pth.tar'
    torch.save({'state_dict': sd, 'extra': _Foreign()}, top_level)  # not inside args: refused just the same
    with pytest.raises(WeightsError, match='refused to unpickle'):
        load_weights(top_level)
    assert not sentinel.exists()
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # allowed for the load only
