"blda.selftrain: EMA teacher, pseudo-labels, ClassMix, strong augmentation, feature distance, MIC block masks."
import math
import pytest
import torch
import torchvision.transforms.functional as TF
from torch import nn
from blda.data import IMAGENET_MEAN, IMAGENET_STD
from blda.selftrain import (FD_THING_CLASSES, _adjust_hue, _hsv_to_rgb, _rgb_to_hsv, block_mask, blur_kernel_size,
                            class_mix, classmix_masks, colour_jitter, disable_stochastic_layers, downscale_label_ratio,
                            ema_alpha, ema_update, feature_distance, gaussian_blur, make_teacher, mask_image, mix,
                            pseudo_labels, strong_augment)

MEAN, STD = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def normalised(images01):
    return (images01 * 255 - MEAN) / STD


# --- EMA teacher -------------------------------------------------------------------------------
def net():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))


def test_ema_schedule():
    assert [ema_alpha(t, 0.99) for t in (0, 1, 3)] == [0.0, 0.5, 0.75]
    assert ema_alpha(10_000, 0.999) == 0.999 and ema_alpha(99, 0.99) == 0.99


def test_ema_copy_formula_and_buffers():
    torch.manual_seed(0)
    student, teacher = net(), net()
    student[1].running_mean.fill_(3.0); student[1].num_batches_tracked.fill_(7)
    assert ema_update(teacher, student, 0) == 0.0
    for t, s in zip(teacher.parameters(), student.parameters()): assert torch.equal(t, s)
    assert torch.all(teacher[1].running_mean == 0) and teacher[1].num_batches_tracked == 0   # buffers untouched
    with torch.no_grad():
        for p in student.parameters(): p.add_(1.0)
    old = [p.clone() for p in teacher.parameters()]
    a = ema_update(teacher, student, 5, alpha=0.99)
    assert a == pytest.approx(1 - 1 / 6)
    for t, o, s in zip(teacher.parameters(), old, student.parameters()):
        assert torch.allclose(t, a * o + (1 - a) * s)
    assert torch.all(teacher[1].running_mean == 0)
    ema_update(teacher, student, 1000, alpha=0.9, update_buffers=True)
    assert torch.allclose(teacher[1].running_mean, torch.full((4,), 0.3)) and teacher[1].num_batches_tracked == 7


def test_teacher_and_stochastic_layers():
    student = net()
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters()) and all(p.requires_grad for p in student.parameters())
    teacher.train(); disable_stochastic_layers(teacher)
    assert teacher[1].training and not teacher[2].training   # BN keeps batch statistics, dropout is off
    x = torch.randn(8, 3)
    assert torch.equal(teacher(x), teacher(x))


# --- pseudo-labels -------------------------------------------------------------------------------
def test_pseudo_label_weight_is_the_batch_fraction():
    logits = torch.zeros(2, 3, 4, 4)
    logits[0, 1, :2] = 10.0                       # 8 confident pixels of 32, label 1
    pl = pseudo_labels(logits)
    assert pl.labels.shape == (2, 4, 4) and pl.labels.dtype == torch.long
    assert torch.all(pl.labels[0, :2] == 1) and torch.all(pl.labels[1] == 0)
    assert torch.all(pl.weight == 0.25)
    per_pixel = pseudo_labels(logits, weighting='pixel')
    assert per_pixel.weight.sum() == 8 and torch.all(per_pixel.weight[0, :2] == 1)
    valid = torch.ones(2, 4, 4); valid[:, 0] = 0
    assert torch.all(pseudo_labels(logits, valid=valid).weight[:, 0] == 0)
    with pytest.raises(ValueError, match='weighting'): pseudo_labels(logits, weighting='soft')


def test_pseudo_label_threshold_inclusive():
    p = 0.968
    logits = torch.log(torch.tensor([p, 1 - p]).view(1, 2, 1, 1)).expand(1, 2, 2, 2)
    assert torch.all(pseudo_labels(logits, threshold=p - 1e-6).weight == 1)


# --- ClassMix ------------------------------------------------------------------------------------
def quirk_labels():
    "Sample 0 holds class 0 only; sample 1 holds 1, 2, 3 and ignore. Batch classes: {0, 1, 2, 3, 255}."
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[1] = torch.tensor([1, 2, 3, 255]).repeat(4, 1)
    return labels


def test_classmix_batch_quirk_vs_sample():
    labels, g = quirk_labels(), torch.Generator().manual_seed(0)
    n = 400
    batch = torch.stack([classmix_masks(labels, generator=g) for _ in range(n)])    # (n, 2, 4, 4)
    sample = torch.stack([classmix_masks(labels, 'sample', generator=g) for _ in range(n)])
    # batch mode: 3 of the 5 batch classes are drawn for each sample, so class 0 is pasted with p = 3/5
    assert abs(batch[:, 0, 0, 0].float().mean() - 0.6) < 0.08
    # … and sample 1 gets 255 pasted sometimes, and between 0 and 3 of its own 4 labels
    assert batch[:, 1, :, 3].any() and batch[:, 1, 0].sum(-1).max() <= 3
    # sample mode: sample 0 always pastes its one class; sample 1 pastes exactly 2 of its 4 labels
    assert sample[:, 0].all() and torch.all(sample[:, 1, 0].sum(-1) == 2)
    excluded = torch.stack([classmix_masks(labels, exclude_ignore=True, generator=g) for _ in range(100)])
    assert not excluded[:, 1, :, 3].any()
    with pytest.raises(ValueError, match='classes'): classmix_masks(labels, 'image')


def test_classmix_masks_follow_the_labels():
    torch.manual_seed(0)
    labels = torch.randint(0, 6, (3, 16, 16))
    masks = classmix_masks(labels, 'sample', generator=torch.Generator().manual_seed(1))
    for lbl, m in zip(labels, masks):
        pasted = torch.unique(lbl[m])
        assert len(pasted) == math.ceil(len(torch.unique(lbl)) / 2)
        assert torch.equal(m, torch.isin(lbl, pasted))   # whole classes, nothing else


def test_mix_consistency_and_no_in_place():
    torch.manual_seed(0)
    src_lbl = torch.randint(0, 5, (2, 8, 8)); trg_lbl = torch.randint(0, 5, (2, 8, 8))
    src_img, trg_img = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    weight = torch.full((2, 8, 8), 0.4)
    copies = [t.clone() for t in (src_img, trg_img, src_lbl, trg_lbl, weight)]
    is_source = classmix_masks(src_lbl, generator=torch.Generator().manual_seed(0))
    out = class_mix(is_source, src_img, trg_img, src_lbl, trg_lbl, weight)
    for a, b in zip(copies, (src_img, trg_img, src_lbl, trg_lbl, weight)): assert torch.equal(a, b)
    assert torch.equal(out.is_target, ~is_source) and out.is_target.dtype == torch.bool
    assert torch.equal(out.labels, torch.where(is_source, src_lbl, trg_lbl))
    assert torch.equal(out.weight, torch.where(is_source, 1.0, 0.4))
    assert torch.equal(out.image, torch.where(is_source[:, None], src_img, trg_img))
    assert torch.equal(mix(is_source, src_lbl, trg_lbl), out.labels)


# --- strong augmentation ------------------------------------------------------------------------
def test_jitter_fires_one_minus_p():
    g = torch.Generator().manual_seed(0)
    img = normalised(torch.rand(1, 3, 2, 2))
    n = 1500
    above = sum(strong_augment(img, g, blur=False).jittered for _ in range(n)) / n
    below = sum(strong_augment(img, g, blur=False, jitter_fires='below').jittered for _ in range(n)) / n
    blurred = sum(strong_augment(img, g, jitter_p=1.0).blurred for _ in range(n)) / n
    assert abs(above - 0.8) < 0.04 and abs(below - 0.2) < 0.04 and abs(blurred - 0.5) < 0.05
    with pytest.raises(ValueError, match='jitter_fires'): strong_augment(img, g, jitter_fires='always')


def test_blur_kernel_size():
    assert blur_kernel_size(512) == 51 and blur_kernel_size(1024) == 103 and blur_kernel_size(64) == 7
    for n in range(8, 2100, 7):
        k = blur_kernel_size(n)
        assert k % 2 == 1 and abs(k - 0.1 * n) <= 1.5, (n, k)


def test_gaussian_blur():
    flat = torch.full((2, 3, 40, 30), 0.3)
    assert torch.allclose(gaussian_blur(flat, [0.5, 1.1]), flat, atol=1e-6)   # weights sum to 1, reflect padding
    spike = torch.zeros(1, 1, 41, 41); spike[0, 0, 20, 20] = 1
    out = gaussian_blur(spike, [1.0])
    assert torch.isclose(out.sum(), torch.tensor(1.0), atol=1e-5) and out[0, 0, 20, 20] < 0.2
    assert torch.allclose(out[0, 0], out[0, 0].T, atol=1e-6)


def test_augmentation_deterministic_and_noop():
    img = normalised(torch.rand(2, 3, 32, 32))
    a = [strong_augment(img, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(a[0].image, a[1].image) and a[0].jittered == a[1].jittered
    none = strong_augment(img, torch.Generator().manual_seed(3), jitter_p=1.0, blur=False)
    assert none.image is img and not none.jittered and not none.blurred


def test_augmentation_stays_in_range_and_changes_images():
    g = torch.Generator().manual_seed(0)
    img = normalised(torch.rand(2, 3, 16, 16))
    for _ in range(10):
        aug = strong_augment(img, g)
        if aug.jittered:
            rgb = (aug.image * STD + MEAN) / 255
            assert rgb.min() > -1e-4 and rgb.max() < 1 + 1e-4 and not torch.allclose(aug.image, img)
            assert not torch.allclose(aug.image[0] - img[0], aug.image[1] - img[1])   # per-image factors


def test_colour_ops():
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(_hsv_to_rgb(_rgb_to_hsv(x)), x, atol=1e-5)
    for h in (-0.2, 0.1):
        assert torch.allclose(_adjust_hue(x, 2 * math.pi * h), TF.adjust_hue(x, h), atol=1e-5)
    out = colour_jitter(x, 0.0, torch.Generator().manual_seed(0))   # strength 0: identity up to HSV round trips
    assert torch.allclose(out, x, atol=1e-5)


# --- feature distance ----------------------------------------------------------------------------
def test_downscale_label_ratio_hand_example():
    lbl = torch.tensor([[[13, 13, 0, 0], [13, 13, 0, 255], [13, 13, 11, 11], [0, 0, 11, 11]]])
    assert downscale_label_ratio(lbl, 2).tolist() == [[[13, 0], [255, 11]]]
    assert downscale_label_ratio(lbl, 2, min_ratio=0.5).tolist() == [[[13, 0], [0, 11]]]   # a tie keeps the lower id
    ign = torch.full((1, 2, 2), 255)
    assert downscale_label_ratio(ign, 2).tolist() == [[[255]]]
    assert downscale_label_ratio(lbl, 4).tolist() == [[[255]]]


def test_feature_distance():
    lbl = torch.tensor([[[13, 13, 0, 0], [13, 13, 0, 255], [13, 13, 11, 11], [0, 0, 11, 11]]])
    student = torch.zeros(1, 4, 2, 2, requires_grad=True)
    reference = torch.zeros(1, 4, 2, 2, requires_grad=True)
    with torch.no_grad(): reference[0, :, 0, 0] = 1.0; reference[0, :, 1, 1] = 3.0; reference[0, :, 0, 1] = 100.0
    fd = feature_distance(student, reference, lbl)
    assert torch.isclose(fd, torch.tensor((2.0 + 6.0) / 2))   # cells of car (13) and person (11); road ignored
    fd.backward()
    assert student.grad is not None and reference.grad is None
    all_cells = feature_distance(student, reference, lbl, classes=None)
    assert torch.isclose(all_cells, torch.tensor((2.0 + 200.0 + 0 + 6.0) / 4))
    assert 13 in FD_THING_CLASSES and 0 not in FD_THING_CLASSES


def test_feature_distance_without_selected_cells():
    student = torch.randn(2, 4, 2, 2, requires_grad=True)
    fd = feature_distance(student, torch.randn(2, 4, 2, 2), torch.zeros(2, 8, 8, dtype=torch.long))
    assert fd.item() == 0 and not torch.isnan(fd)
    fd.backward()
    assert torch.all(student.grad == 0)


# --- MIC block masks -----------------------------------------------------------------------------
def test_block_mask_ratio_and_blocks():
    g = torch.Generator().manual_seed(0)
    m = block_mask((64, 64, 96), block_size=16, generator=g)
    assert m.shape == (64, 1, 64, 96) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert abs(m.mean().item() - 0.3) < 0.02                     # ~70 % of the blocks are masked
    blocks = m.view(64, 1, 4, 16, 6, 16)
    assert torch.all(blocks.amax((3, 5)) == blocks.amin((3, 5)))   # constant on every 16×16 block
    assert block_mask((1, 100, 50), 32).shape == (1, 1, 100, 50)   # round(100/32) × round(50/32) grid, resized
    assert torch.all(block_mask((2, 8, 8), 4, ratio=0.0, generator=g) == 1)   # ratio 0 keeps (almost surely) everything


def test_mask_image():
    img = torch.randn(2, 3, 8, 8)
    m = block_mask((2, 8, 8), 4, generator=torch.Generator().manual_seed(1))
    out = mask_image(img, m)
    assert torch.all(out[m.expand_as(img) == 0] == 0) and torch.equal(out[m.expand_as(img) == 1], img[m.expand_as(img) == 1])
