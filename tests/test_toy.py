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
    assert tgt[person] > 1.5 * src[person] and src[truck] > 1.5 * tgt[truck]    # label shift both ways (about 2× and 3×)

@pytest.mark.slow
def test_default_size_within_budget(tmp_path):
    start = time.perf_counter()
    config = toy_config('default')
    summary = make_toy(tmp_path, config, nproc=2, progress=False)
    assert summary['generated'] == sum(config['counts'].values()) and time.perf_counter() - start < 60

def test_real_size_trains_through_the_gta2cs_path(real_toy, tmp_path):
    """`--size real`: GTA5- and Cityscapes-size images in their layouts; with the gta2cs roots pointed at them, the
    source is resized to 1280×704 and the target to 1024×512, 2 iterations of 512 crops train on the CPU and evaluate
    one image, and a sliding-window evaluation scores the full-size label."""
    from conftest import train_quietly
    from blda.data import gta_dataset
    from blda.evaluate import evaluate
    from blda.train import TrainConfig, resolve_host, validation_set
    assert len(list((real_toy/'source'/'images').glob('*.png'))) == 4 and len(list((real_toy/'source_val'/'images').glob('*.png'))) == 2
    assert [len(list((real_toy/'target'/'leftImg8bit'/s).glob('*/*.png'))) for s in ('train', 'val')] == [3, 2]
    assert Image.open(real_toy/'source'/'images'/'00001.png').size == Image.open(real_toy/'source'/'labels'/'00001_labelTrainIds.png').size == (1914, 1052)
    val = sorted((real_toy/'target'/'gtFine'/'val').glob('*/*_gtFine_labelTrainIds.png'))
    assert len(val) == 2 and Image.open(val[0]).size == (2048, 1024)
    assert gta_dataset(real_toy/'source', crop_size=None, flip_prob=0)[0]['img'].shape == (3, 704, 1280)
    cfg = TrainConfig(data='gta2cs', source_root=str(real_toy/'source'), target_root=str(real_toy/'target'), encoder='mit_b0',
                      embed_dim=16, crop_size=(512, 512), iterations=2, eval_interval=2, eval_max_images=1, checkpoint_interval=0,
                      log_interval=1, output_dir=str(tmp_path/'run'), device='cpu', progress=False)
    res = train_quietly(cfg)
    assert res.iteration == 2 and res.final_eval['images'] == 1
    ds = validation_set(cfg, resolve_host(cfg)[0])
    assert ds[0]['img'].shape == (3, 512, 1024) and ds[0]['gt'].shape == (1024, 2048)   # test scale, full-size label
    slide = evaluate(res.state.student, ds, mode='slide', crop=(512, 512), stride=(341, 341), max_images=1)   # 1 × 3 windows
    assert slide['images'] == 1 and 0 <= slide['mIoU'] <= 100

def test_appearance_shift_is_bounded(tmp_path, capsys):
    "A shift that would paint a class in another class's colour is shortened; None keeps it; a bad group is named."
    from blda.toy import target_colors
    config = toy_config(override={'appearance_shift': {'person': [-140, 20, 90]}})   # red person → towards car blue
    source = np.array(config['source_color']['person'], float)
    bounded = target_colors(config)[11]
    raw = target_colors({**config, 'appearance_shift_limit': None})[11]
    car = np.array(config['source_color']['car'], float)
    assert np.linalg.norm(raw - car) < np.linalg.norm(raw - source)            # unbounded: nearer the car's colour
    assert np.linalg.norm(bounded - source) < np.linalg.norm(bounded - car)    # bounded: still a person's
    bad = tmp_path/'bad.json'
    bad.write_text(json.dumps({'confusable': [['person', 'ryder']]}))
    assert main(['toy', str(tmp_path/'out'), '--size', 'tiny', '--config', str(bad)]) == 2
    assert "'ryder'" in capsys.readouterr().err and not (tmp_path/'out'/'source').exists()
