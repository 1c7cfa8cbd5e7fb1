"The blda command line: commands run, and user errors are one clean line without a traceback."
import os
import subprocess
import sys
from pathlib import Path
from blda.cli import main

BLDA = [sys.executable, '-m', 'blda.cli']


def run(args, **kw):
    return subprocess.run([str(Path(sys.executable).parent / 'blda'), *args], capture_output=True, text=True, **kw)


def test_demo_runs_and_reports_bias(capsys):
    assert main(['demo', '--steps', '20', '--eval-pixels', '20000']) == 0
    out = capsys.readouterr().out
    assert 'bicycle' in out and 'max |Bias|' in out and 'τ=1.0' in out


def test_settings_and_bad_settings_file(tmp_path):
    ok = run(['settings'])
    assert ok.returncode == 0 and 'cityscapes' in ok.stdout
    bad = tmp_path / 'settings.ini'
    bad.write_text('[paths]\ngta5 = /x\n')
    r = run(['settings'], env={**os.environ, 'BLDA_SETTINGS': str(bad)})
    assert r.returncode == 2 and 'gta5' in r.stderr and str(bad) in r.stderr and 'Traceback' not in r.stderr
    r = run(['settings'], env={**os.environ, 'BLDA_SETTINGS': str(tmp_path / 'missing.ini')})
    assert r.returncode == 2 and 'missing.ini' in r.stderr and 'Traceback' not in r.stderr


def test_bad_parameter_is_a_clean_error():
    r = run(['demo', '--steps', '0'])
    assert r.returncode == 2 and '--steps' in r.stderr and 'Traceback' not in r.stderr


def test_benchmark_small(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    assert main(['benchmark', '--device', 'cpu', '--shape', '1', '4', '32', '32', '--posthoc-size', '16', '16',
                 '--repeats', '2', '--json', str(out)]) == 0
    import json
    r = json.loads(out.read_text())
    assert r['source_ratio'] > 0 and r['posthoc_ms'] > 0
