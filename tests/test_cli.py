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


def test_benchmark_train(tmp_path, capsys):
    "`blda benchmark --train`: two short runs on a toy it generates (and keeps in --data), and the share they give."
    out, data = tmp_path/'train.json', tmp_path/'toy'
    assert main(['benchmark', '--train', '--device', 'cpu', '--host', 'source_only', '--crop', '32', '32',
                 '--iterations', '6', '--rounds', '2', '--data', str(data), '--json', str(out)]) == 0
    import json
    r = json.loads(out.read_text())
    assert r['host_seconds_per_iter'] > 0 and r['blda_seconds_per_iter'] > 0
    assert len(r['blda_share_per_round']) == 2 and r['blda_share'] in r['blda_share_per_round']
    assert all(s < 1 for s in r['blda_share_per_round'])
    assert len(r['blda_timed_share_per_round']) == 2 and all(0 < s < 1 for s in r['blda_timed_share_per_round'])
    assert 0 < r['host_criterion_seconds_per_iter'] < r['blda_criterion_seconds_per_iter']
    assert (r['host'], r['crop'], r['iterations'], r['rounds']) == ('source_only', [32, 32], 6, 2)
    assert "BLDA's share of the step" in capsys.readouterr().out
    assert (data/'source'/'sample_class_stats.json').is_file() and (data/'target'/'sample_class_stats.json').is_file()


def test_benchmark_train_bad_options(tmp_path, capsys):
    "Bad options are one clean line each, before any toy image is made."
    data = tmp_path/'toy'
    for argv, words in ((['--iterations', '3'], '--iterations must be at least 6'), (['--host', 'nope'], 'host must be one of'),
                        (['--encoder', 'resnet7'], 'not an smp encoder'), (['--crop', '0', '32'], '--crop must be at least 1')):
        assert main(['benchmark', '--train', '--device', 'cpu', '--data', str(data), *argv]) == 2
        assert words in capsys.readouterr().err
    assert not data.exists()
