"""`blda train` and `blda evaluate` (CPU, MiT-B0, tiny toy benchmark, 32×32 crops)."""
import argparse, dataclasses, json, subprocess, sys, warnings
from pathlib import Path

import pytest

from blda.cli import build_parser, main
from blda.settings import load_settings
from blda.train import TrainConfig
from blda.config import resolve_config
from blda.train_cli import field_options, given_fields

BLDA = str(Path(sys.executable).parent/'blda')
NON_FIELDS = {'help', 'config', 'print_config'}

def small(toy: Path, out: Path, *extra: str) -> list[str]:
    return ['train', '--data', 'toy', '--source-root', str(toy/'source'), '--target-root', str(toy/'target'),
            '--output-dir', str(out), '--encoder', 'mit_b0', '--crop-size', '32', '32', '--iterations', '6',
            '--warmup-iters', '2', '--lr', '1e-3', '--eval-interval', '6', '--checkpoint-interval', '0',
            '--min-pixels', '10', '--rcs-min-pixels', '10', '--pseudo-threshold', '0.3', '--log-interval', '1',
            '--no-progress', *extra]

def subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser(name)
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]

# ------------------------------------------------------------------------------------------ options
def test_every_field_is_an_option():
    dests = {a.dest for a in subparser('train')._actions} - NON_FIELDS
    assert dests == {f.name for f in dataclasses.fields(TrainConfig)}
    flags = {a.dest: a.option_strings for a in subparser('train')._actions}
    assert flags['crop_size'] == ['--crop-size'] and flags['blda'] == ['--blda', '--no-blda']
    assert flags['rcs'] == ['--rcs', '--no-rcs']
    by_name = {o.name: o for o in field_options()}
    assert (by_name['eval_max_images'].base, by_name['eval_max_images'].optional) == (int, True)
    assert (by_name['pseudo_margins'].length, by_name['gmm_momentum'].base) == (4, float)

def test_option_types_and_layering(tmp_path):
    args = subparser('train').parse_args(['--host', 'mic', '--blda', '--crop-size', '48', '40', '--alpha', 'none',
                                          '--no-rcs', '--tau', '0.3', '--eval-max-images', '2'])
    given = given_fields(args)
    assert given == dict(host='mic', blda=True, crop_size=[48, 40], alpha=None, rcs=False, tau=0.3, eval_max_images=2)
    base = dict(TrainConfig(data='toy', seed=3, tau=0.5).to_dict(), output_dir=str(tmp_path/'o'))
    cfg = resolve_config(given, base)
    assert (cfg.crop_size, cfg.tau, cfg.seed, cfg.rcs, cfg.output_dir) == ((48, 40), 0.3, 3, False, str(tmp_path/'o'))

def test_defaults_from_settings(tmp_path, monkeypatch, capsys):
    ini = tmp_path/'settings.ini'
    ini.write_text('[paths]\ntoy = data/toy\ncityscapes = /cs\nresults = out\n')
    monkeypatch.setenv('BLDA_SETTINGS', str(ini))
    assert main(['train', '--data', 'toy', '--host', 'mic', '--blda', '--seed', '2', '--print-config']) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg['source_root'] == str(tmp_path/'data/toy/source') and cfg['target_root'] == str(tmp_path/'data/toy/target')
    assert cfg['output_dir'] == str(tmp_path/'out'/'toy-mic-blda-T-s2') and cfg['host'] == 'mic' and cfg['seed'] == 2
    s = load_settings(ini)
    cfg = resolve_config(dict(data='synthia2cs', output_dir='x'), settings=s)
    assert (cfg.source_root, cfg.target_root) == (str(s.synthia), '/cs')
    assert resolve_config(dict(source_root='/s', target_root='/t', output_dir='x'), settings=s).source_root == '/s'

# ------------------------------------------------------------------------------------------ errors
def test_bad_value_is_one_clean_line():
    r = subprocess.run([BLDA, 'train', '--tau', '-1', '--print-config'], capture_output=True, text=True)
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert r.stderr.strip().count('\n') == 0 and '--tau' in r.stderr and '-1' in r.stderr

def test_bad_choices_and_missing_data(tmp_path, capsys):
    assert main(['train', '--data', 'nope', '--print-config']) == 2
    assert "--data must be one of" in capsys.readouterr().err
    assert main(['train', '--host', 'hrdaa', '--print-config']) == 2
    assert "--host must be one of" in capsys.readouterr().err
    assert main(['train', '--encoder', 'resnet7', '--print-config']) == 2
    assert "--encoder is not an smp encoder" in capsys.readouterr().err
    assert main(['train', '--data', 'toy', '--source-root', str(tmp_path/'none'), '--target-root', str(tmp_path/'none'),
                 '--encoder-weights', str(tmp_path/'mit_b5.pth'), '--output-dir', str(tmp_path/'run'), '--no-progress']) == 2
    assert f"--encoder-weights {tmp_path/'mit_b5.pth'}: no such file" in capsys.readouterr().err
    assert main(['train', '--data', 'toy', '--source-root', str(tmp_path/'none'), '--target-root', str(tmp_path/'none'),
                 '--output-dir', str(tmp_path/'run'), '--no-progress']) == 2
    err = capsys.readouterr().err
    assert err.startswith('blda train: error:') and 'not found' in err
    bad = tmp_path/'bad.json'; bad.write_text('{"tua": 1}')
    assert main(['train', '--config', str(bad), '--print-config']) == 2 and 'tua' in capsys.readouterr().err

# ------------------------------------------------------------------------------------------ end to end
def test_train_then_evaluate(toy, tmp_path, capsys):
    run = tmp_path/'run'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')                                  # RCS drops classes absent from the tiny toy
        assert main(small(toy, run, '--host', 'mic', '--blda')) == 0
    assert (run/'checkpoint.pt').is_file() and json.loads((run/'config.json').read_text())['host'] == 'mic'
    assert 'toy-mic-blda-T-s0 at iteration 6/6' in capsys.readouterr().out

    assert main(['evaluate', str(run), '--posthoc-tau', '0.2', '--quiet']) == 0
    out = capsys.readouterr().out
    assert 'mIoU' in out and 'mAcc' in out and 'post-hoc τ=0.2' in out
    m = json.loads((run/'metrics.json').read_text())
    assert {'mIoU', 'mIoU_std', 'mAcc', 'mAcc_std', 'IoU', 'Acc', 'bias', 'posthoc'} <= set(m)
    assert m['iteration'] == 6 and m['weights'] == 'student' and 0 <= m['mIoU'] <= 100
    logged = [r for r in map(json.loads, (run/'metrics.jsonl').read_text().splitlines()) if r['kind'] == 'eval'][-1]
    assert m['mIoU'] == pytest.approx(logged['mIoU'])                   # the loop's own evaluation of the student
    assert not [p for p in run.iterdir() if p.name.endswith('.tmp')]

    assert main(['evaluate', str(run/'checkpoint.pt'), '--weights', 'teacher', '--mode', 'slide', '--max-images', '1',
                 '--out', str(tmp_path/'t.json'), '--quiet']) == 0
    t = json.loads((tmp_path/'t.json').read_text())
    assert (t['weights'], t['mode'], t['images'], t['posthoc_tau']) == ('teacher', 'slide', 1, None)

    capsys.readouterr()
    assert main(small(toy, run, '--host', 'mic', '--blda', '--tau', '0.3')) == 2        # would resume another run
    err = capsys.readouterr().err
    assert '--tau 0.1 → 0.3' in err and '--no-resume' in err
    assert main(['evaluate', str(tmp_path/'nowhere')]) == 2

def test_evaluate_posthoc_needs_blda(toy, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert main(small(toy, tmp_path/'r', '--host', 'source_only', '--iterations', '2', '--eval-interval', '0')) == 0
    assert main(['evaluate', str(tmp_path/'r'), '--posthoc-tau', '0.2']) == 2
    assert '--blda' in capsys.readouterr().err
    assert main(['evaluate', str(tmp_path/'r'), '--weights', 'teacher']) == 2             # source-only has no teacher

def test_full_disk_keeps_the_last_checkpoint(toy, tmp_path, capsys, monkeypatch):
    "The disk fills up while the second checkpoint is written: one clear line, the first checkpoint intact, resumable."
    import torch
    from conftest import FullDisk
    real_save, saves = torch.save, []
    def save(obj, f, *args, **kwargs):
        saves.append(obj.get('iteration'))
        return real_save(obj, FullDisk(f, 4096) if len(saves) == 2 else f, *args, **kwargs)
    run = tmp_path/'run'
    argv = small(toy, run, '--host', 'source_only', '--iterations', '4', '--eval-interval', '0', '--checkpoint-interval', '2')
    monkeypatch.setattr(torch, 'save', save)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert saves == [2, 4] and err.count('\n') == 1 and 'Traceback' not in err
        assert err.startswith(f"blda train: error: cannot write {run/'checkpoint.pt'}: No space left on device")
        assert sorted(p.name for p in run.iterdir()) == ['checkpoint.pt', 'config.json', 'metrics.jsonl']
        assert torch.load(run/'checkpoint.pt', weights_only=True)['iteration'] == 2
        monkeypatch.undo()
        assert main(argv) == 0                                           # resumes at 2 once there is room again
    assert 'at iteration 4/4' in capsys.readouterr().out
    assert torch.load(run/'checkpoint.pt', weights_only=True)['iteration'] == 4

def test_unusable_checkpoint_is_one_line(toy, tmp_path, capsys):
    "A truncated checkpoint, a file that is not one, and another program's checkpoint: refused by name, not a traceback."
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert main(small(toy, tmp_path/'r', '--host', 'source_only', '--iterations', '2', '--eval-interval', '0')) == 0
    capsys.readouterr()
    good = tmp_path/'r'/'checkpoint.pt'
    data = good.read_bytes()
    cases = {'truncated': data[:len(data) // 2], 'text': b'not a checkpoint\n'}
    for name, content in cases.items():
        run = tmp_path/name; run.mkdir(); (run/'config.json').write_bytes((tmp_path/'r'/'config.json').read_bytes())
        (run/'checkpoint.pt').write_bytes(content)
        assert main(['evaluate', str(run), '--quiet']) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"blda evaluate: error: {run/'checkpoint.pt'} is not a readable checkpoint") and err.count('\n') == 1
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            assert main(small(toy, run, '--host', 'source_only', '--iterations', '2', '--eval-interval', '0')) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"blda train: error: cannot resume: {run/'checkpoint.pt'} is not a readable checkpoint")
        assert 'Traceback' not in err and (run/'checkpoint.pt').read_bytes() == content       # left as it was
    (tmp_path/'junk.pth').write_bytes(b'junk')                        # encoder weights that are not weights
    assert main(small(toy, tmp_path/'w', '--encoder-weights', str(tmp_path/'junk.pth'))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"blda train: error: --encoder-weights {tmp_path/'junk.pth'} cannot be read as tensors") and err.count('\n') == 1
    assert not (tmp_path/'w').exists()                                  # no run folder for a run that never started
    torch.save({'model': {}}, tmp_path/'foreign.pt')
    assert main(['evaluate', str(tmp_path/'foreign.pt'), '--quiet']) == 2
    assert "was not written by blda train (no iteration, config, state, rng, log)" in capsys.readouterr().err
