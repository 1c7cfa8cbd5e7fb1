"""`blda.mic`: the masked-target component and the MIC host (CPU, MiT-B0, tiny toy benchmark, 32×32 crops)."""
import copy, dataclasses, math
from pathlib import Path

import pytest

from conftest import assert_same_state, checked_train_log, train_once_and_resumed, train_quietly
import torch

import blda.mic
from blda.losses import BLDALoss
from blda.mic import (DAFORMER, MIC, MaskedConsistency, MICPart, masked_target, mic_block_size,
                      without_tracker_update)
from blda.models import build_model
from blda.tracker import LogitTracker
from blda.train import HOSTS, TrainConfig, resolve_host
from blda.uda import PlainCriterion, StepConfig, UDABatch, uda_step, update_teacher

ITERATIONS = 36   # "a few dozen" (issue 4)

def config(toy: Path, out: Path, **kw) -> TrainConfig:
    base = dict(host='mic', encoder='mit_b0', data='toy', source_root=str(toy/'source'), target_root=str(toy/'target'),
                crop_size=(32, 32), iterations=ITERATIONS, warmup_iters=3, lr=1e-3, log_interval=1,
                eval_interval=ITERATIONS, checkpoint_interval=0, min_pixels=10, rcs_min_pixels=10,
                pseudo_threshold=0.3, output_dir=str(out), progress=False)
    return TrainConfig(**(base | kw))

def step(criterion, components, seed=0, threshold=0.06):
    "One DACS step of a fresh MiT-B0 on random tensors; a low threshold gives the untrained teacher's labels weight."
    torch.manual_seed(seed)
    student = build_model('T', 19, 'mit_b0', cdf_head=isinstance(criterion, BLDALoss))
    teacher = copy.deepcopy(student).requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    batch = UDABatch(torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 19, (2, 32, 32), generator=g),
                     torch.randn(2, 3, 32, 32, generator=g))
    cfg = StepConfig(pseudo_threshold=threshold)
    update_teacher(teacher, student, 0, cfg)
    return uda_step(student, teacher, batch, 0, cfg, criterion, components, torch.Generator().manual_seed(seed))

# ------------------------------------------------------------------------------------------ the masked image
def test_block_mask_size_and_ratio():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(8, 3, 64, 64)
    for block, ratio in [(4, 0.7), (16, 0.3)]:
        m = masked_target(image, StepConfig(), block, ratio, generator=g)
        cells = m.mask.view(8, 1, 64 // block, block, 64 // block, block)
        assert (cells == cells[:, :, :, :1, :, :1]).all()                  # constant on each block
        assert abs((1 - m.mask.mean().item()) - ratio) < 0.1               # about `ratio` of the blocks masked
        assert torch.equal(m.image, m.image * m.mask)                      # masked pixels are 0 (the mean colour)
    assert masked_target(image, StepConfig(), 8, 0.0, generator=g).mask.all()
    assert (mic_block_size(512), mic_block_size(1024), mic_block_size(128), mic_block_size(32), mic_block_size(8)) == \
        (32, 64, 8, 2, 1)
    assert mic_block_size(32, 5) == 5
    # no augmentation: the image is only masked; the same generator state gives the same mask
    a = masked_target(image, StepConfig(), 8, augment=False, generator=torch.Generator().manual_seed(1))
    b = masked_target(image, StepConfig(), 8, augment=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.image, image * a.mask) and torch.equal(a.mask, b.mask) and not (a.jittered or a.blurred)

def test_component_uses_configured_block_and_ratio(monkeypatch):
    calls = []
    real = blda.mic.block_mask
    def spy(shape, block_size, ratio, generator=None, device=None):
        calls.append((tuple(shape), block_size, ratio))
        return real(shape, block_size, ratio, generator, device)
    monkeypatch.setattr(blda.mic, 'block_mask', spy)
    step(PlainCriterion(), [MaskedConsistency(block_size=8, ratio=0.5)])
    step(PlainCriterion(), [MaskedConsistency()])
    assert calls == [((2, 32, 32), 8, 0.5), ((2, 32, 32), 2, 0.7)]         # None: 1/16 of the crop height
    for bad in (dict(ratio=1.0), dict(ratio=-0.1), dict(block_size=0), dict(weight=-1.0)):
        with pytest.raises(ValueError, match='MaskedConsistency'): MaskedConsistency(**bad)

# ------------------------------------------------------------------------------------------ criterion and tracker
def test_masked_pass_does_not_update_the_tracker():
    out_plain = step(PlainCriterion(), [MaskedConsistency(block_size=8)])
    assert out_plain.pseudo_weight > 0 and out_plain.losses['mic'] > 0
    with_mic, without = BLDALoss(LogitTracker(19, min_pixels=1)), BLDALoss(LogitTracker(19, min_pixels=1))
    out = step(with_mic, [MaskedConsistency(block_size=8)])
    step(without, [])
    assert math.isfinite(out.losses['mic']) and with_mic.update                   # the step's criterion is untouched
    assert with_mic.tracker.estimated('target').any()
    for (k, a), b in zip(with_mic.tracker.state_dict().items(), without.tracker.state_dict().values()):
        assert torch.equal(a, b), k
    fed = BLDALoss(LogitTracker(19, min_pixels=1))
    step(fed, [MaskedConsistency(block_size=8, update_tracker=True)])
    assert any(not torch.equal(a, b) for a, b in zip(fed.tracker.state_dict().values(), without.tracker.state_dict().values()))
    view = without_tracker_update(with_mic)
    assert view.tracker is with_mic.tracker and not view.update
    plain = PlainCriterion()
    assert without_tracker_update(plain) is plain

def test_weight_scales_the_loss():
    one = step(PlainCriterion(), [MaskedConsistency(block_size=8)]).losses['mic']
    half = step(PlainCriterion(), [MaskedConsistency(block_size=8, weight=0.5)]).losses['mic']
    assert torch.allclose(half, 0.5 * one)

# ------------------------------------------------------------------------------------------ the host
def test_mic_host_is_daformer_plus_component():
    assert HOSTS['mic'] is MIC and MIC.parts == DAFORMER.parts + (MICPart(),)
    assert MIC.step == DAFORMER.step and (MIC.fd_weight, MIC.rare_class_sampling) == (DAFORMER.fd_weight, True)
    assert MIC.options() == dict(mask_block_size=None, mask_ratio=0.7, mic_weight=1.0, mask_augment=True)
    host, _ = resolve_host(TrainConfig(host='mic', fd_weight=0.0, alpha=0.9))
    assert MICPart() in host.parts and host.fd_weight == 0 and host.step.alpha == 0.9
    comps = host.build_components(build_model('T', 19, 'mit_b0'))
    assert [type(c) for c in comps] == [MaskedConsistency]
    comps = MIC.with_options(mask_block_size=16, mask_ratio=0.5).build_components(build_model('T', 19, 'mit_b0'))
    assert (comps[-1].block_size, comps[-1].ratio) == (16, 0.5)

@pytest.mark.parametrize('blda', [False, True], ids=['plain', 'blda'])
def test_mic_trains_with_finite_losses(toy, tmp_path, blda):
    res = train_quietly(config(toy, tmp_path, blda=blda))
    train_log = checked_train_log(res, ITERATIONS, {'src_ce', 'mix_ce', 'fd', 'mic', 'pseudo_weight'})
    assert any(r['mic'] > 0 for r in train_log)
    assert [type(c).__name__ for c in res.state.components] == ['FeatureDistance', 'MaskedConsistency']
    assert res.final_eval is not None and 0 <= res.final_eval['mIoU'] <= 100
    if blda: assert res.state.criterion.tracker.estimated('target').any()

def test_mic_blda_resume_is_bit_exact(toy, tmp_path):
    "The masked pass draws from the step's generator, so a resumed MIC run equals an uninterrupted one."
    once, twice = train_once_and_resumed(config(toy, tmp_path/'once', blda=True, iterations=4, eval_interval=0))
    assert_same_state(once, twice, ('student', 'teacher', 'criterion'))
    assert [r['mic'] for r in once.log] == [r['mic'] for r in twice.log]
