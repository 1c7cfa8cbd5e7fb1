"""`blda toy`: determinism, layout, re-runs, configs, and the phenomena the benchmark promises."""
import json, time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blda.cli import main
from blda.toy import TRAIN_ID_TO_LABEL_ID, generate_scene, make_toy, toy_config, toy_files

def files_of(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob('*.png'))}

def test_tiny_deterministic_and_seed_dependent(tmp_path):
    for name, seed in (('a', 0), ('b', 0), ('c', 1)):
        assert main(['toy', str(tmp_path/name), '--size', 'tiny', '--seed', str(seed)]) == 0
    a, b, c = (files_of(tmp_path/n) for n in 'abc')
    assert a == b and len(a) == 2 * (6 + 2 + 4 + 2)   # source, source_val, target train and val
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)

def test_layout_and_label_ids(tmp_path):
    config = toy_config('tiny')
    make_toy(tmp_path, config, progress=False)
    assert sorted(p.name for p in (tmp_path/'source'/'images').iterdir()) == [f'{i:05d}.png' for i in range(1, 7)]
    assert sorted(p.name for p in (tmp_path/'source'/'labels').iterdir()) == [f'{i:05d}.png' for i in range(1, 7)]
    for folder in ('images', 'labels'):   # the held-out source split, same layout
        assert sorted(p.name for p in (tmp_path/'source_val'/folder).iterdir()) == ['00001.png', '00002.png']
    held_out = Image.open(tmp_path/'source_val'/'images'/'00001.png')
    assert all(np.asarray(held_out).tobytes() != np.asarray(Image.open(p)).tobytes() for p in (tmp_path/'source'/'images').iterdir())
    for split, cities, n in (('train', {'toyburg', 'simville'}, 4), ('val', {'valtown'}, 2)):
        images = sorted((tmp_path/'target'/'leftImg8bit'/split).glob('*/*_leftImg8bit.png'))
        labels = sorted((tmp_path/'target'/'gtFine'/split).glob('*/*_gtFine_labelIds.png'))
        assert len(images) == len(labels) == n and {p.parent.name for p in images} == cities
        assert [p.name.replace('_leftImg8bit', '') for p in images] == [p.name.replace('_gtFine_labelIds', '') for p in labels]
    known = set(TRAIN_ID_TO_LABEL_ID) | {0, 1}
    for _, _, img, lab in toy_files(config, tmp_path):
        im, lb = Image.open(img), Image.open(lab)
        assert im.mode == 'RGB' and lb.mode == 'L' and im.size == lb.size == (64, 32)
        assert set(np.unique(np.asarray(lb))) <= known
    assert json.loads((tmp_path/'toy_config.json').read_text())['complete'] is True
    assert not [p for p in tmp_path.rglob('*') if '.tmp' in p.name]

def test_rerun_skips_and_resumes(tmp_path):
    config = toy_config('tiny')
    assert make_toy(tmp_path, config, progress=False)['generated'] == 14
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob('*.png')}
    assert make_toy(tmp_path, config, progress=False)['generated'] == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob('*.png')} == before
    # an interrupted run: one file missing, the stamp not complete → only that file is redone
    victim = tmp_path/'source'/'images'/'00003.png'
    content = victim.read_bytes(); victim.unlink()
    stamp = json.loads((tmp_path/'toy_config.json').read_text()); stamp['complete'] = False
    (tmp_path/'toy_config.json').write_text(json.dumps(stamp))
    summary = make_toy(tmp_path, config, progress=False)
    assert summary['generated'] == 1 and victim.read_bytes() == content

def test_full_disk_is_one_line_and_resumable(tmp_path, capsys, monkeypatch):
    "The disk fills up at the fifth PNG: one line naming it, no partial file; the rerun finishes the same benchmark."
    import builtins
    import blda.files
    from conftest import disk_full
    opened = []
    def full_open(file, mode='r', *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)
        if 'w' in mode and Path(file).name.startswith('.') and '.png.' in Path(file).name:
            opened.append(file)
            if len(opened) >= 5:
                f.write = lambda b: (_ for _ in ()).throw(disk_full())
        return f
    monkeypatch.setattr(blda.files, 'open', full_open, raising=False)
    assert main(['toy', str(tmp_path/'a'), '--size', 'tiny']) == 1
    err = capsys.readouterr().err
    last = err.splitlines()[-1]                                          # after the progress bar's last line
    assert last.startswith('blda toy: error: cannot write ') and last.endswith('.png: No space left on device')
    assert 'Traceback' not in err
    assert len(files_of(tmp_path/'a')) == 4 and not [p for p in tmp_path.rglob('*') if '.tmp' in p.name]
    assert json.loads((tmp_path/'a'/'toy_config.json').read_text())['complete'] is False
    monkeypatch.undo()
    assert main(['toy', str(tmp_path/'a'), '--size', 'tiny']) == 0
    assert main(['toy', str(tmp_path/'b'), '--size', 'tiny']) == 0
    assert files_of(tmp_path/'a') == files_of(tmp_path/'b')

def test_other_config_in_same_folder_is_refused(tmp_path, capsys):
    assert main(['toy', str(tmp_path), '--size', 'tiny']) == 0
    assert main(['toy', str(tmp_path), '--size', 'tiny', '--seed', '5']) == 2
    assert 'another config or seed' in capsys.readouterr().err

def test_config_file(tmp_path, capsys):
    good = tmp_path/'good.json'
    good.write_text(json.dumps({'image_size': [48, 24], 'domains': {'target': {'instances': {'person': 9}}}}))
    assert main(['toy', str(tmp_path/'out'), '--size', 'tiny', '--config', str(good)]) == 0
    assert Image.open(tmp_path/'out'/'source'/'images'/'00001.png').size == (48, 24)
    bad = tmp_path/'bad.json'
    bad.write_text(json.dumps({'domains': {'target': {'instancez': {}}}}))
    assert main(['toy', str(tmp_path/'out2'), '--config', str(bad)]) == 2
    assert 'domains.target.instancez' in capsys.readouterr().err
    (tmp_path/'broken.json').write_text('{')
    assert main(['toy', str(tmp_path/'out3'), '--config', str(tmp_path/'broken.json')]) == 2
    assert main(['toy', '--print-config']) == 0
    assert json.loads(capsys.readouterr().out) == toy_config()

def test_nproc_same_bytes(tmp_path):
    config = toy_config('tiny')
    make_toy(tmp_path/'one', config, progress=False)
    make_toy(tmp_path/'two', config, nproc=2, progress=False)
    assert files_of(tmp_path/'one') == files_of(tmp_path/'two')

def class_frequencies(domain: str, n: int) -> np.ndarray:
    "Pixel frequency of each train id over `n` default-size scenes."
    to_train = np.full(256, 255, np.uint8); to_train[list(TRAIN_ID_TO_LABEL_ID)] = np.arange(19)
    counts = np.zeros(256)
    for i in range(n): counts += np.bincount(to_train[generate_scene(toy_config(), domain, 0, i)[1]].ravel(), minlength=256)
    return counts[:19] / counts[:19].sum()

def test_long_tail_and_label_shift():
    src, tgt = class_frequencies('source', 60), class_frequencies('target', 60)
    for f in (src, tgt):
        assert (f > 0).all()                          # every class occurs
        assert f.max() / f.min() > 100                # strongly long-tailed
    person, truck = 11, 14
    assert tgt[person] > 2 * src[person] and src[truck] > 2 * tgt[truck]    # label shift both ways

@pytest.mark.slow
def test_default_size_within_budget(tmp_path):
    start = time.perf_counter()
    config = toy_config('default')
    summary = make_toy(tmp_path, config, nproc=2, progress=False)
    assert summary['generated'] == sum(config['counts'].values()) and time.perf_counter() - start < 60
