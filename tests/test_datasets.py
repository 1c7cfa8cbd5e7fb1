"""`blda.data`: transforms, datasets in the reference layouts, rare-class sampling, UDA pairs, margins."""
import json, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blda.convert import prepare
from blda.data import (DataNotReady, RareClassSampler, RCSConfig, SegTransform, UDADataset, cat_max_ratio_crop,
                       cityscapes_dataset, crop_pseudo_weight, denormalize, gta_dataset, rcs_class_probabilities,
                       synthia_dataset, toy_source_dataset, toy_target_dataset, valid_pseudo_mask)

# ------------------------------------------------------------------------------------------ transforms
def coded_image(label: np.ndarray) -> np.ndarray:
    "An RGB image whose red channel is 10 × the label, so image and label can be checked against each other."
    return np.stack([label * 10, np.zeros_like(label), np.zeros_like(label)], -1).astype(np.uint8)

def test_crop_flip_keep_image_and_label_aligned():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 19, (40, 60)).astype(np.uint8)
    t = SegTransform(crop_size=(16, 24), cat_max_ratio=0.75, flip_prob=0.5)
    flips = set()
    for _ in range(20):
        img, maps, flip = t(coded_image(label), {'gt': label}, rng)
        flips.add(flip)
        assert img.shape == (3, 16, 24) and maps['gt'].shape == (16, 24)
        np.testing.assert_array_equal(denormalize(img)[..., 0], maps['gt'].numpy() * 10)
        # the crop is a real window of the label, mirrored when flipped
        crop = maps['gt'].numpy()[:, ::-1] if flip else maps['gt'].numpy()
        windows = [(y, x) for y in range(25) for x in range(37) if np.array_equal(label[y:y + 16, x:x + 24], crop)]
        assert len(windows) == 1
    assert flips == {True, False}

def test_resize_keeps_ratio_and_nearest_labels():
    label = np.repeat(np.array([[0, 13, 255]], np.uint8), 35, axis=0).repeat(20, axis=1)    # 35 x 60
    img, maps, _ = SegTransform(scale=(30, 15), flip_prob=0)(coded_image(np.minimum(label, 19)), {'gt': label},
                                                              np.random.default_rng(0))
    assert img.shape == (3, 15, 26) and maps['gt'].shape == (15, 26)     # min(30/60, 15/35) = 0.43 → 25.7 × 15
    assert set(np.unique(maps['gt'].numpy())) == {0, 13, 255}

def test_full_res_label_for_evaluation():
    label = np.zeros((20, 40), np.uint8)
    img, maps, _ = SegTransform(scale=(20, 10), flip_prob=0, label_at_full_res=True)(coded_image(label), {'gt': label},
                                                                                     np.random.default_rng(0))
    assert img.shape == (3, 10, 20) and maps['gt'].shape == (20, 40)

def test_pad_to_crop_size():
    label = np.full((10, 12), 7, np.uint8)
    img, maps, _ = SegTransform(crop_size=(16, 16), flip_prob=0)(coded_image(label), {'gt': label, 'valid_pseudo_mask':
                                                                 np.ones_like(label)}, np.random.default_rng(0))
    assert img.shape == (3, 16, 16) and (img[:, 10:] == 0).all()
    assert (maps['gt'][10:] == 255).all() and (maps['gt'][:10, :12] == 7).all()
    assert maps['valid_pseudo_mask'][:, 12:].sum() == 0

def test_cat_max_ratio():
    label = np.zeros((64, 64), np.uint8); label[:, 40:] = 13
    rng = np.random.default_rng(1)
    for _ in range(50):
        y0, y1, x0, x1 = cat_max_ratio_crop(label, (32, 32), rng)
        share = (label[y0:y1, x0:x1] == 13).mean()
        assert 0.25 < share < 0.75
    # ignore pixels do not count: a crop of road + ignore only has one class → rejected until the tries run out
    only_road = np.where(np.arange(64)[None, :] < 32, 0, 255).astype(np.uint8).repeat(64, 0)
    assert cat_max_ratio_crop(only_road, (32, 32), rng) is not None

# ------------------------------------------------------------------------------------------ margins
def test_pseudo_margins_v1_v2():
    w = crop_pseudo_weight(torch.ones(2, 512, 512), 15, 120)
    assert w.sum() == 2 * 512 * (512 - 135) and w[:, 14].sum() == 0 and w[:, 15].all() and w[:, 391].all() and w[:, 392].sum() == 0
    m = valid_pseudo_mask(10, 20, (1, 2, 3, 4))
    assert m.sum() == 7 * 13 and m[1, 3] == 1 and m[0, 3] == 0 and m[8, 5] == 0 and m[5, 16] == 0 and m[5, 15] == 1

def test_valid_pseudo_mask_follows_the_sample(toy):
    ds = toy_target_dataset(toy, crop_size=None, flip_prob=0, pseudo_margins=(2, 5, 1, 0))
    s = ds[0]
    assert s['valid_pseudo_mask'].dtype == torch.bool and s['valid_pseudo_mask'].shape == s['gt'].shape == (32, 64)
    assert s['valid_pseudo_mask'].sum() == (32 - 7) * 63
    torch.manual_seed(0)
    ds = toy_target_dataset(toy, crop_size=(16, 16), flip_prob=1.0, pseudo_margins=(0, 0, 5, 0))
    for _ in range(5):   # the left margin appears on the right of a flipped crop, never on its left
        mask = ds[0]['valid_pseudo_mask']
        assert mask[:, 0].all()

# ------------------------------------------------------------------------------------------ datasets
def test_toy_datasets(toy):
    src, tgt, val = toy_source_dataset(toy, crop_size=(16, 16)), toy_target_dataset(toy), toy_target_dataset(toy, 'val', crop_size=None, flip_prob=0)
    assert (len(src), len(tgt), len(val)) == (6, 4, 2)
    s = src[0]
    assert s['img'].shape == (3, 16, 16) and s['img'].dtype == torch.float32 and s['gt'].dtype == torch.int64
    assert s['ori_shape'].tolist() == [32, 64] and s['name'] == '00001'
    v = val[1]
    assert v['img'].shape == (3, 32, 64) and v['gt'].shape == (32, 64) and v['label_path'].endswith('_gtFine_labelTrainIds.png')
    assert set(v['gt'].unique().tolist()) <= set(range(19)) | {255}
    assert (v['gt'][-1, 16:48] == 255).all()    # the bonnet is ignored
    # normalisation: ImageNet mean/std on 0-255 RGB
    raw = np.asarray(Image.open(val.images[1]), np.float32)
    np.testing.assert_allclose(v['img'][0].numpy(), (raw[..., 0] - 123.675) / 58.395, rtol=1e-5, atol=1e-5)

def test_synthia_dataset(tmp_path):
    import cv2
    root = tmp_path/'synthia'; (root/'RGB').mkdir(parents=True); (root/'GT'/'LABELS').mkdir(parents=True)
    bgr = np.zeros((38, 64, 3), np.uint16); bgr[..., 2] = 3; bgr[:10, :, 2] = 1
    cv2.imwrite(str(root/'GT'/'LABELS'/'0000000.png'), bgr)
    Image.fromarray(np.zeros((38, 64, 3), np.uint8)).save(root/'RGB'/'0000000.png')
    with pytest.raises(DataNotReady, match='blda prepare synthia'): synthia_dataset(root)
    prepare('synthia', root, progress=False)
    s = synthia_dataset(root, crop_size=(16, 16))[0]                  # scale 1280×760 → 64×38 is upscaled ×20
    assert s['img'].shape == (3, 16, 16) and set(s['gt'].unique().tolist()) <= {0, 10}
    s = synthia_dataset(root, scale=(64, 38), crop_size=None, flip_prob=0)[0]
    assert s['gt'][:10].eq(10).all() and s['gt'][10:].eq(0).all()

def test_missing_data_errors(tmp_path, toy):
    with pytest.raises(DataNotReady, match='nowhere'): gta_dataset(tmp_path/'nowhere')
    with pytest.raises(DataNotReady, match='nowhere'): cityscapes_dataset(tmp_path/'nowhere')
    with pytest.raises(DataNotReady, match='nowhere'): synthia_dataset(tmp_path/'nowhere')
    # images without converted labels
    root = tmp_path/'gta'; (root/'images').mkdir(parents=True); (root/'labels').mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root/'images'/'00001.png')
    with pytest.raises(DataNotReady, match='blda prepare gta'): gta_dataset(root)
    with pytest.raises(DataNotReady, match='blda prepare gta'): RareClassSampler(root)
    with pytest.raises(DataNotReady, match='blda prepare cityscapes'):
        RareClassSampler(tmp_path, dataset='cityscapes')

# ------------------------------------------------------------------------------------------ RCS
def test_rcs_probabilities_by_hand(toy):
    stats = json.loads((toy/'source'/'sample_class_stats.json').read_text())
    totals = {}
    for s in stats:
        for c, n in s.items():
            if c != 'file': totals[int(c)] = totals.get(int(c), 0) + n
    classes, probs = rcs_class_probabilities(stats, temperature=0.01)
    assert sorted(classes) == sorted(totals) and [totals[c] for c in classes] == sorted(totals.values())
    f = np.array([totals[c] for c in classes], np.float64); f /= f.sum()
    expected = np.exp((1 - f) / 0.01 - ((1 - f) / 0.01).max()); expected /= expected.sum()
    np.testing.assert_allclose(probs, expected, rtol=1e-10)
    assert probs[0] == probs.max() and probs[-1] == probs.min()       # rarest is likeliest

def test_rcs_sampler_filters_and_drops(toy):
    with_class = json.loads((toy/'source'/'samples_with_class.json').read_text())
    threshold = 40
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        sampler = RareClassSampler(toy/'source', RCSConfig(min_pixels=threshold))
    for c in sampler.classes:
        assert sorted(sampler.files[c]) == sorted(Path(f).name for f, n in with_class[str(c)] if n > threshold)
    dropped = [int(c) for c, fs in with_class.items() if not any(n > threshold for _, n in fs)]
    assert set(sampler.classes).isdisjoint(dropped)
    assert bool(dropped) == any('not sampled' in str(w.message) for w in caught)
    np.testing.assert_allclose(sampler.probs.sum(), 1.0)

def test_uda_batches_with_rcs(toy):
    torch.manual_seed(0)
    sampler = RareClassSampler(toy/'source', RCSConfig(min_pixels=5, min_crop_ratio=0.5))
    uda = UDADataset(toy_source_dataset(toy, crop_size=(24, 24)),
                     toy_target_dataset(toy, crop_size=(24, 24), pseudo_margins=(0, 3, 0, 0)), sampler)
    assert len(uda) == 6 * 4
    loader = torch.utils.data.DataLoader(uda, batch_size=4, num_workers=0)
    hits, total, drawn = 0, 0, []
    for _, batch in zip(range(6), loader):
        assert batch['source']['img'].shape == (4, 3, 24, 24) and batch['target']['img'].shape == (4, 3, 24, 24)
        assert batch['target']['valid_pseudo_mask'].shape == (4, 24, 24)
        c = batch['rcs_class']
        drawn += c.tolist()
        hits += int(((batch['source']['gt'] == c[:, None, None]).sum((1, 2)) > 0).sum()); total += len(c)
    assert set(drawn) <= set(sampler.classes) and len(set(drawn)) > 3
    assert hits >= 0.8 * total           # the crop keeps the sampled class (re-drawn up to 10 times)

def test_uda_without_rcs_pairs_all(toy):
    uda = UDADataset(toy_source_dataset(toy), toy_target_dataset(toy))
    item = uda[7]                       # source 7 // 4 = 1, target 7 % 4 = 3
    assert item['source']['index'] == 1 and item['target']['index'] == 3 and item['rcs_class'] == -1

def test_uda_with_multiple_workers(toy):
    torch.manual_seed(0)
    sampler = RareClassSampler(toy/'source', RCSConfig(min_pixels=5))
    uda = UDADataset(toy_source_dataset(toy, crop_size=(16, 16)), toy_target_dataset(toy, crop_size=(16, 16)), sampler)
    loader = torch.utils.data.DataLoader(uda, batch_size=2, num_workers=2)
    batches = [b for _, b in zip(range(4), loader)]
    # workers draw different streams: the four batches are not copies of one another
    imgs = [b['source']['img'] for b in batches]
    assert not all(torch.equal(imgs[0], x) for x in imgs[1:])
