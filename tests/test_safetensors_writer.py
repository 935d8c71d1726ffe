"""SafetensorsWriter: a streamed file reads back exactly through safetensors itself; a failed one leaves nothing."""
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from advprop_zoo.weights import SafetensorsWriter, WeightsError, read_safetensors_header, sha256_file

RNG = np.random.default_rng(0)
ARRAYS = {'bn.num_batches_tracked': np.array(7, dtype=np.int64),
          'conv.weight': RNG.standard_normal((8, 3, 3, 3)).astype(np.float32),
          'bn.running_var': RNG.random(8).astype(np.float32),
          'head.weight': RNG.standard_normal((5, 8)).astype(np.float64)}
LAYOUT = [(k, a.dtype.name, a.shape) for k, a in ARRAYS.items()]


def test_streamed_file_reads_back_exactly_with_late_metadata(tmp_path):
    out = tmp_path / 'w.safetensors'
    with SafetensorsWriter(out, LAYOUT, flush_every=64) as w:  # tiny flush step: the flusher thread runs
        for k, a in ARRAYS.items():
            w.write(k, a)
        mid = load_file(str(w.temp_path))  # complete before the rename, for checks on it
        w.metadata = {'source_sha256': 'ab' * 32}  # known only at the end
    assert not list(tmp_path.glob('.w.safetensors.*'))  # the temp file became `out`
    for loaded in (load_file(str(out)), mid):
        assert loaded.keys() == ARRAYS.keys()
        for k, a in ARRAYS.items():
            assert torch.equal(loaded[k], torch.from_numpy(a)), k
    with safe_open(str(out), 'pt') as f:
        assert f.metadata() == {'source_sha256': 'ab' * 32}
    read_safetensors_header(out)  # our own validator agrees: offsets tile the data, size fits
    assert (8 + int.from_bytes(out.read_bytes()[:8], 'little')) % 8 == 0  # data section 8-byte aligned


@pytest.mark.parametrize('fault, match', [
    ('order', "expected 'bn.num_batches_tracked'"),
    ('shape', 'expected'),
    ('missing', 'only 3 of 4 arrays'),
    ('metadata', 'over its reserve'),
    ('raise', 'reader died'),
])
def test_a_failed_stream_leaves_the_old_file_and_no_temp(tmp_path, fault, match):
    out = tmp_path / 'w.safetensors'
    out.write_bytes(b'old')
    with pytest.raises((WeightsError, RuntimeError), match=match):
        with SafetensorsWriter(out, LAYOUT, metadata_reserve=64) as w:
            items = list(ARRAYS.items())
            if fault == 'order':
                items.reverse()
            if fault == 'shape':
                items[1] = (items[1][0], items[1][1][:4])
            for k, a in items[:3] if fault == 'missing' else items:
                w.write(k, a)
                if fault == 'raise':
                    raise RuntimeError('reader died')
            if fault == 'metadata':
                w.metadata = {'x': 'y' * 200}
    assert out.read_bytes() == b'old'
    assert [p.name for p in tmp_path.iterdir()] == ['w.safetensors']


@pytest.mark.parametrize('size', [0, 1, (1 << 20) - 1, (1 << 20) + 7, 3 << 20])
def test_sha256_file_matches_hashlib_across_buffer_edges(tmp_path, size):
    """The reused read buffer: each chunk hashed up to what was read, none twice, the last one short."""
    import hashlib
    data = RNG.integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / 'blob'
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_sha256_file_stops_when_asked(tmp_path):
    import hashlib
    import threading
    path = tmp_path / 'blob'
    path.write_bytes(b'x' * (3 << 20))
    stop = threading.Event()
    stop.set()
    assert sha256_file(path, stop) != hashlib.sha256(path.read_bytes()).hexdigest()  # gave up early
