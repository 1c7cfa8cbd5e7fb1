"""`blda prepare`: every converter on tiny fixtures in the exact reference layouts, and every bad input."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import disk_full
from blda.cli import main
from blda.errors import UserError
from blda.convert import (CITYSCAPES_ID_TO_TRAIN_ID, SYNTHIA_ID_TO_TRAIN_ID, class_stats_files, prepare)

# ------------------------------------------------------------------------------------------ fixtures
H, W = 6, 8

def ids_image(ids, seed=0):
    "An (H, W) uint8 label holding every id of `ids` at least once."
    rng = np.random.default_rng(seed)
    lab = rng.choice(np.array(ids, np.uint8), size=(H, W))
    lab.flat[:len(ids)] = ids
    return lab

def rgb(h=H, w=W):
    return np.zeros((h, w, 3), np.uint8)

def make_gta(root: Path, labels: list[np.ndarray]) -> Path:
    (root/'images').mkdir(parents=True); (root/'labels').mkdir()
    for i, lab in enumerate(labels):
        Image.fromarray(lab).save(root/'labels'/f'{i + 1:05d}.png')
        Image.fromarray(rgb(*lab.shape)).save(root/'images'/f'{i + 1:05d}.png')
    return root

def make_synthia(root: Path, labels: list[np.ndarray]) -> Path:
    "SYNTHIA GT/LABELS: 16-bit 3-channel PNGs; class id in R, an instance id (large) in G."
    (root/'RGB').mkdir(parents=True); (root/'GT'/'LABELS').mkdir(parents=True)
    for i, lab in enumerate(labels):
        bgr = np.zeros(lab.shape + (3,), np.uint16)
        bgr[..., 2] = lab                   # R (last in OpenCV order): the class id
        bgr[..., 1] = 1000 + 7 * lab.astype(np.uint16)   # G: an instance id that must not be read as a class
        assert cv2.imwrite(str(root/'GT'/'LABELS'/f'{i:07d}.png'), bgr)
        Image.fromarray(rgb(*lab.shape)).save(root/'RGB'/f'{i:07d}.png')
    return root

def make_cityscapes(root: Path, splits: dict[str, list[np.ndarray]], city='aachen') -> Path:
    for split, labels in splits.items():
        (root/'gtFine'/split/city).mkdir(parents=True); (root/'leftImg8bit'/split/city).mkdir(parents=True)
        for i, lab in enumerate(labels):
            stem = f'{city}_000000_{i:06d}'
            Image.fromarray(lab).save(root/'gtFine'/split/city/f'{stem}_gtFine_labelIds.png')
            Image.fromarray(rgb(*lab.shape)).save(root/'leftImg8bit'/split/city/f'{stem}_leftImg8bit.png')
    return root

def read(path):
    return np.asarray(Image.open(path))

def mapped(lab, table):
    lut = np.full(256, 255, np.uint8)
    for k, v in table.items(): lut[k] = v
    return lut[lab]

def snapshot(root: Path) -> dict:
    "path → (mtime_ns, bytes) of every file under root."
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob('*') if p.is_file()}

GTA_LABELS = [ids_image([7, 26, 24]), ids_image([7, 8, 0, 1]), ids_image([11, 23, 33, 26], seed=2)]

# ------------------------------------------------------------------------------------------ label tables
def test_cityscapes_table_matches_cityscapesscripts():
    from cityscapesscripts.helpers.labels import labels
    assert CITYSCAPES_ID_TO_TRAIN_ID == {l.id: l.trainId for l in labels if 0 <= l.trainId < 255}
    assert sorted(CITYSCAPES_ID_TO_TRAIN_ID.values()) == list(range(19))

def test_synthia_table_matches_cityscapes_names():
    from cityscapesscripts.helpers.labels import name2label
    synthia_names = {1: 'sky', 2: 'building', 3: 'road', 4: 'sidewalk', 5: 'fence', 6: 'vegetation', 7: 'pole',
                     8: 'car', 9: 'traffic sign', 10: 'person', 11: 'bicycle', 12: 'motorcycle', 15: 'traffic light',
                     16: 'terrain', 17: 'rider', 18: 'truck', 19: 'bus', 20: 'train', 21: 'wall'}
    assert SYNTHIA_ID_TO_TRAIN_ID == {k: name2label[n].trainId for k, n in synthia_names.items()}

# ------------------------------------------------------------------------------------------ converters
def test_gta(tmp_path):
    root = make_gta(tmp_path/'gta', GTA_LABELS)
    assert main(['prepare', 'gta', str(root), '--quiet']) == 0
    for i, lab in enumerate(GTA_LABELS):
        out = root/'labels'/f'{i + 1:05d}_labelTrainIds.png'
        assert Image.open(out).mode == 'L'
        np.testing.assert_array_equal(read(out), mapped(lab, CITYSCAPES_ID_TO_TRAIN_ID))
    stats = json.loads((root/'sample_class_stats.json').read_text())
    first = mapped(GTA_LABELS[0], CITYSCAPES_ID_TO_TRAIN_ID)
    assert stats[0] == {**{str(c): int((first == c).sum()) for c in (0, 11, 13)}, 'file': 'labels/00001_labelTrainIds.png'}
    by_file = json.loads((root/'sample_class_stats_dict.json').read_text())
    assert by_file['labels/00002_labelTrainIds.png'] == {k: v for k, v in stats[1].items() if k != 'file'}
    with_class = json.loads((root/'samples_with_class.json').read_text())
    assert [f for f, _ in with_class['13']] == ['labels/00001_labelTrainIds.png', 'labels/00003_labelTrainIds.png']
    assert '255' not in with_class and set(with_class) == {'0', '1', '2', '10', '11', '13', '18'}

def test_synthia_16bit(tmp_path):
    labels = [ids_image([3, 4, 10, 17, 0, 13]), ids_image([1, 2, 21, 22, 8])]
    root = make_synthia(tmp_path/'synthia', labels)
    assert cv2.imread(str(root/'GT'/'LABELS'/'0000000.png'), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    assert main(['prepare', 'synthia', str(root), '--quiet']) == 0
    for i, lab in enumerate(labels):
        out = root/'GT'/'LABELS'/f'{i:07d}_labelTrainIds.png'
        np.testing.assert_array_equal(read(out), mapped(lab, SYNTHIA_ID_TO_TRAIN_ID))
    stats = json.loads((root/'sample_class_stats.json').read_text())
    assert [s['file'] for s in stats] == ['GT/LABELS/0000000_labelTrainIds.png', 'GT/LABELS/0000001_labelTrainIds.png']
    assert set(stats[0]) - {'file'} == {'0', '1', '11', '12'}

def test_cityscapes_ids_and_polygons(tmp_path):
    root = make_cityscapes(tmp_path/'cs', {'train': [GTA_LABELS[0], GTA_LABELS[1]], 'val': [GTA_LABELS[2]]})
    # a second city with polygons only: a road lower half, a car box, a person in a 'persongroup'
    poly_dir = root/'gtFine'/'train'/'bonn'; poly_dir.mkdir(); (root/'leftImg8bit'/'train'/'bonn').mkdir()
    objects = [{'label': 'road', 'polygon': [[0, 3], [7, 3], [7, 5], [0, 5]]},
               {'label': 'car', 'polygon': [[1, 0], [3, 0], [3, 2], [1, 2]]},
               {'label': 'persongroup', 'polygon': [[5, 0], [6, 0], [6, 1], [5, 1]]}]
    (poly_dir/'bonn_000000_000000_gtFine_polygons.json').write_text(
        json.dumps({'imgHeight': H, 'imgWidth': W, 'objects': objects}))
    Image.fromarray(rgb()).save(root/'leftImg8bit'/'train'/'bonn'/'bonn_000000_000000_leftImg8bit.png')
    assert main(['prepare', 'cityscapes', str(root), '--quiet']) == 0
    out = read(poly_dir/'bonn_000000_000000_gtFine_labelTrainIds.png')
    assert out.shape == (H, W) and out[4, 3] == 0 and out[1, 2] == 13 and out[0, 0] == 255
    np.testing.assert_array_equal(read(root/'gtFine'/'val'/'aachen'/'aachen_000000_000000_gtFine_labelTrainIds.png'),
                                  mapped(GTA_LABELS[2], CITYSCAPES_ID_TO_TRAIN_ID))
    stats = json.loads((root/'sample_class_stats.json').read_text())
    files = [s['file'] for s in stats]
    assert files == ['gtFine/train/aachen/aachen_000000_000000_gtFine_labelTrainIds.png',
                     'gtFine/train/aachen/aachen_000000_000001_gtFine_labelTrainIds.png',
                     'gtFine/train/bonn/bonn_000000_000000_gtFine_labelTrainIds.png']     # train split only
    assert '11' in stats[2] and '13' in stats[2]

def test_polygons_match_cityscapesscripts_json2labelImg(tmp_path):
    from cityscapesscripts.preparation.json2labelImg import json2labelImg
    root = tmp_path/'cs'
    (root/'gtFine'/'train'/'c').mkdir(parents=True); (root/'leftImg8bit'/'train'/'c').mkdir(parents=True)
    objects = [{'label': 'sky', 'polygon': [[0, 0], [30, 0], [30, 8], [0, 8]]},
               {'label': 'building', 'polygon': [[2, 3], [12, 1], [20, 9], [4, 15]]},
               {'label': 'license plate', 'polygon': [[5, 5], [9, 5], [9, 7], [5, 7]]}]
    js = root/'gtFine'/'train'/'c'/'c_000000_000000_gtFine_polygons.json'
    js.write_text(json.dumps({'imgHeight': 20, 'imgWidth': 32, 'objects': objects}))
    Image.fromarray(rgb(20, 32)).save(root/'leftImg8bit'/'train'/'c'/'c_000000_000000_leftImg8bit.png')
    prepare('cityscapes', root, progress=False)
    json2labelImg(str(js), str(tmp_path/'ref.png'), 'trainIds')
    np.testing.assert_array_equal(read(js.with_name('c_000000_000000_gtFine_labelTrainIds.png')), read(tmp_path/'ref.png'))

def test_idempotent(tmp_path):
    root = make_gta(tmp_path/'gta', GTA_LABELS)
    first = prepare('gta', root, progress=False)
    before = snapshot(root)
    again = prepare('gta', root, progress=False)
    assert (first.written, again.written, again.existing, again.stats_files) == (3, 0, 3, [])
    assert snapshot(root) == before                      # nothing rewritten, not even the statistics
    (root/'sample_class_stats.json').unlink()             # statistics complete again from finished outputs
    prepare('gta', root, progress=False)
    assert (root/'sample_class_stats.json').read_bytes() == before[root/'sample_class_stats.json'][1]

def test_nproc_gives_same_result(tmp_path):
    labels = [ids_image([7, 8, 11, 26, 24, 0], seed=s) for s in range(12)]
    a, b = make_cityscapes(tmp_path/'a', {'train': labels}), make_cityscapes(tmp_path/'b', {'train': labels})
    assert main(['prepare', 'cityscapes', str(a), '--quiet']) == 0
    assert main(['prepare', 'cityscapes', str(b), '--quiet', '--nproc', '2']) == 0
    rel = lambda root: {p.relative_to(root): p.read_bytes() for p in root.rglob('*') if p.is_file()}
    assert rel(a) == rel(b)

def test_class_stats_files_content():
    files = class_stats_files([{3: 5, 0: 7, 'file': 'b.png'}, {0: 1, 'file': 'a.png'}])
    assert files['sample_class_stats.json'] == [{'0': 1, 'file': 'a.png'}, {'3': 5, '0': 7, 'file': 'b.png'}]
    assert files['sample_class_stats_dict.json'] == {'a.png': {'0': 1}, 'b.png': {'3': 5, '0': 7}}
    assert files['samples_with_class.json'] == {'0': [['a.png', 1], ['b.png', 7]], '3': [['b.png', 5]]}

# ------------------------------------------------------------------------------------------ bad input
def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob('*') if '.tmp' in p.name]

def run_cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err

def corrupt(path: Path):   path.write_bytes(b'not a png at all')
def truncate(path: Path):  path.write_bytes(path.read_bytes()[:40])
def make_rgb(path: Path):  Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(path)
def unknown_id(path: Path): Image.fromarray(ids_image([7, 40])).save(path)
def wrong_size(path: Path): Image.fromarray(np.full((H + 1, W), 7, np.uint8)).save(path)

@pytest.mark.parametrize('damage, words', [(corrupt, 'unreadable or corrupt'), (truncate, 'unreadable or corrupt'),
                                           (make_rgb, 'mode RGB'), (unknown_id, 'unknown label id(s) [40]'),
                                           (wrong_size, 'label is 8×7 but its image')])
def test_bad_gta_label(tmp_path, capsys, damage, words):
    root = make_gta(tmp_path/'gta', GTA_LABELS)
    damage(root/'labels'/'00002.png')
    code, err = run_cli(['prepare', 'gta', str(root), '--quiet'], capsys)
    assert code == 2 and words in err and '00002.png' in err and 'Traceback' not in err
    assert not (root/'labels'/'00002_labelTrainIds.png').exists()             # nothing for the bad file
    assert (root/'labels'/'00001_labelTrainIds.png').exists()                 # the good ones are done
    assert not (root/'sample_class_stats.json').exists() and no_temp_files(root)
    # --skip-bad: exit 0, the bad file listed and left out of the statistics
    code = main(['prepare', 'gta', str(root), '--quiet', '--skip-bad'])
    out = capsys.readouterr().out
    assert code == 0 and 'skipped:' in out and '00002.png' in out
    stats = json.loads((root/'sample_class_stats.json').read_text())
    assert [s['file'] for s in stats] == ['labels/00001_labelTrainIds.png', 'labels/00003_labelTrainIds.png']

def test_unknown_ids_ignore(tmp_path):
    root = make_gta(tmp_path/'gta', [ids_image([7, 40, 26])])
    assert main(['prepare', 'gta', str(root), '--quiet', '--unknown-ids', 'ignore']) == 0
    np.testing.assert_array_equal(read(root/'labels'/'00001_labelTrainIds.png'), mapped(ids_image([7, 40, 26]), CITYSCAPES_ID_TO_TRAIN_ID))

def test_missing_image(tmp_path, capsys):
    root = make_gta(tmp_path/'gta', GTA_LABELS)
    (root/'images'/'00003.png').unlink()
    code, err = run_cli(['prepare', 'gta', str(root), '--quiet'], capsys)
    assert code == 2 and 'image not found' in err and '00003.png' in err

def test_truncated_image_needs_verify(tmp_path, capsys):
    root = make_gta(tmp_path/'gta', GTA_LABELS)
    big = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    Image.fromarray(big).save(root/'images'/'00001.png')
    truncate(root/'images'/'00001.png')
    code, err = run_cli(['prepare', 'gta', str(root), '--quiet', '--verify-images'], capsys)
    assert code == 2 and 'images/00001.png' in err and 'corrupt' in err

@pytest.mark.parametrize('dataset, layout', [('gta', 'labels'), ('synthia', 'GT'), ('cityscapes', 'gtFine')])
def test_missing_folder(tmp_path, capsys, dataset, layout):
    code, err = run_cli(['prepare', dataset, str(tmp_path/'nope')], capsys)
    assert code == 2 and 'nope' in err and 'Traceback' not in err
    (tmp_path/'empty').mkdir()
    code, err = run_cli(['prepare', dataset, str(tmp_path/'empty')], capsys)
    assert code == 2 and 'missing folder' in err and layout in err

def test_no_labels(tmp_path, capsys):
    (tmp_path/'gta'/'labels').mkdir(parents=True)
    code, err = run_cli(['prepare', 'gta', str(tmp_path/'gta')], capsys)
    assert code == 2 and 'no label files' in err

def test_bad_synthia_label(tmp_path, capsys):
    root = make_synthia(tmp_path/'synthia', [ids_image([3, 4]), ids_image([3, 8])])
    corrupt(root/'GT'/'LABELS'/'0000001.png')
    bgr = np.zeros((H, W, 3), np.uint16); bgr[..., 2] = 300          # an id far outside SYNTHIA's table
    cv2.imwrite(str(root/'GT'/'LABELS'/'0000000.png'), bgr)
    code, err = run_cli(['prepare', 'synthia', str(root), '--quiet'], capsys)
    assert code == 2 and '2 bad input file(s)' in err and '0000001.png: unreadable' in err and '[300]' in err
    assert no_temp_files(root)

def test_bad_polygons(tmp_path, capsys):
    root = make_cityscapes(tmp_path/'cs', {'train': [GTA_LABELS[0]]})
    d = root/'gtFine'/'train'/'aachen'
    (d/'aachen_000000_000001_gtFine_polygons.json').write_text(
        json.dumps({'imgHeight': H, 'imgWidth': W, 'objects': [{'label': 'dragon', 'polygon': [[0, 0], [1, 0], [1, 1]]}]}))
    Image.fromarray(rgb()).save(root/'leftImg8bit'/'train'/'aachen'/'aachen_000000_000001_leftImg8bit.png')
    (d/'aachen_000000_000002_gtFine_polygons.json').write_text('{broken json')
    Image.fromarray(rgb()).save(root/'leftImg8bit'/'train'/'aachen'/'aachen_000000_000002_leftImg8bit.png')
    code, err = run_cli(['prepare', 'cityscapes', str(root), '--quiet'], capsys)
    assert code == 2 and "unknown label name(s) ['dragon']" in err and '000002_gtFine_polygons.json' in err

def test_write_failure_leaves_no_partial_output(tmp_path, monkeypatch):
    root = make_gta(tmp_path/'gta', GTA_LABELS[:1])
    def failing_save(self, fp, *args, **kwargs):
        fp.write(b'half')               # something lands on disk, then the disk is full
        raise disk_full()
    monkeypatch.setattr(Image.Image, 'save', failing_save)
    out = root/'labels'/'00001_labelTrainIds.png'
    with pytest.raises(UserError, match=f'cannot write {out}: No space left on device'):
        prepare('gta', root, progress=False)
    assert not (root/'labels'/'00001_labelTrainIds.png').exists() and no_temp_files(root)
