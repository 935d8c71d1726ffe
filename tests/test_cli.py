"""The advprop-zoo command line."""
import subprocess
import sys

import pytest
import timm
from safetensors.torch import save_file

from advprop_zoo.cli import main
from conftest import random_state_dict


def test_list_shows_nine_models_and_cache_state(hub_cache, capsys, tmp_path):
    path = tmp_path / 'w.safetensors'
    save_file(random_state_dict(timm.create_model('efficientnet_b0_advprop')), str(path))
    hub_cache('timm/tf_efficientnet_b0.ap_in1k', 'model.safetensors', path.read_bytes())
    assert main(['list']) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith('| efficientnet_b')]
    assert len(rows) == 9
    assert '5.29M' in rows[0] and ' 224 |' in rows[0] and 'PGD1_eps1' in rows[0] and rows[0].rstrip(' |').endswith('ap_in1k')
    assert '87.41M' in rows[8] and '672' in rows[8] and 'PGD5_eps4' in rows[8] and rows[8].rstrip(' |').endswith('no')
    assert 'mean = std = 0.5' in out


def test_console_script_help():
    out = subprocess.run([sys.executable, '-m', 'advprop_zoo.cli', '--help'], capture_output=True, text=True, check=True)
    assert 'list' in out.stdout


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert 'usage' in capsys.readouterr().out


def test_unknown_command_is_an_error():
    with pytest.raises(SystemExit):
        main(['frobnicate'])
