"""`blda.uda`: the self-training step, criteria, components and hosts (CPU, random tensors, MiT-B0)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from blda.losses import BLDALoss
from blda.models import build_model
from blda.selftrain import classmix_masks
from blda.tracker import LogitTracker
from blda.hosts import HOSTS
from blda.uda import (DACS, DAFORMER, SOURCE_ONLY, Component, Criterion, FeatureDistance, PlainCriterion,
                      StepConfig, UDABatch, teacher_pseudo_labels, uda_step, update_teacher, upsample)

H = W = 32

def make_batch(seed: int = 0, classes: int = 19) -> UDABatch:
    g = torch.Generator().manual_seed(seed)
    return UDABatch(torch.randn(2, 3, H, W, generator=g), torch.randint(0, classes, (2, H, W), generator=g),
                    torch.randn(2, 3, H, W, generator=g))

@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return build_model('T', 19, 'mit_b0', cdf_head=True)

def grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]

# ------------------------------------------------------------------------------------------ config and criteria
def test_step_config_names_bad_field():
    for bad, name in [(dict(alpha=1.0), 'alpha'), (dict(teacher_mode='x'), 'teacher_mode'),
                      (dict(mix_classes='x'), 'mix_classes'), (dict(jitter_fires='x'), 'jitter_fires'),
                      (dict(pseudo_crop_rows=(1,)), 'pseudo_crop_rows'), (dict(pseudo_weighting='x'), 'pseudo_weighting')]:
        with pytest.raises(ValueError, match=f"StepConfig.{name}"): StepConfig(**bad)

def test_reference_defaults_and_hosts():
    s = StepConfig()
    assert (s.mix_classes, s.jitter_fires, s.ema_buffers, s.teacher_mode, s.pseudo_weighting) == \
        ('batch', 'above', False, 'train', 'batch_fraction')
    assert {'source_only', 'dacs', 'daformer'} <= set(HOSTS) and all(HOSTS[h.name] is h for h in (SOURCE_ONLY, DACS, DAFORMER))
    assert not SOURCE_ONLY.step.target_branch and DACS.step.alpha == 0.99
    assert (DAFORMER.step.alpha, DAFORMER.step.pseudo_crop_rows, DAFORMER.fd_weight, DAFORMER.rare_class_sampling) == \
        (0.999, (15, 120), 0.005, True)
    # DAFormer is DACS plus its additions: the other step settings are DACS's
    assert {k: v for k, v in vars(DAFORMER.step).items() if k not in ('alpha', 'pseudo_crop_rows')} == \
        {k: v for k, v in vars(DACS.step).items() if k not in ('alpha', 'pseudo_crop_rows')}

def test_plain_criterion_is_mean_over_all_pixels():
    z, y = torch.randn(2, 5, 4, 4), torch.randint(0, 5, (2, 4, 4))
    y[0, :2] = 255
    w = torch.rand(2, 4, 4)
    c = PlainCriterion()
    assert isinstance(c, Criterion) and isinstance(BLDALoss(LogitTracker(5)), Criterion)
    ref = (F.cross_entropy(z, y, ignore_index=255, reduction='none') * w).sum() / y.numel()
    assert torch.allclose(c.mixed(z, y, torch.ones_like(y, dtype=torch.bool), w).total, ref)
    assert torch.allclose(PlainCriterion('valid').source(z, y).total, F.cross_entropy(z, y, ignore_index=255))

# ------------------------------------------------------------------------------------------ the step
def test_source_only_uses_no_target(model):
    m = copy.deepcopy(model); m.zero_grad()
    batch = make_batch()
    torch.manual_seed(0)                                                 # the same dropout draws
    out = uda_step(m, None, batch, 0, SOURCE_ONLY.step, PlainCriterion())
    assert set(out.losses) == {'src_ce', 'src_cdf'}
    g1 = grads(m); m.zero_grad()
    batch.target_image = torch.full_like(batch.target_image, 1e3)      # the target cannot matter
    torch.manual_seed(0)
    uda_step(m, None, batch, 0, SOURCE_ONLY.step, PlainCriterion())
    assert all(torch.equal(a, b) for a, b in zip(g1, grads(m)))

def test_step_is_reproducible_from_its_generator(model):
    def run():
        torch.manual_seed(5)
        m = copy.deepcopy(model); t = copy.deepcopy(model).requires_grad_(False)
        update_teacher(t, m, 0, DACS.step)
        out = uda_step(m, t, make_batch(1), 0, DACS.step, PlainCriterion(), generator=torch.Generator().manual_seed(3))
        return out, grads(m)
    (o1, g1), (o2, g2) = run(), run()
    assert o1.floats() == o2.floats() and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert all(torch.isfinite(v) for v in o1.losses.values())

class Recorder(Component):
    "A component that adds one loss at each hook and records what it saw."
    def __init__(self):
        super().__init__(); self.seen = {}
    def after_source(self, ctx):
        self.seen['source'] = ctx.source_logits is not None and ctx.pseudo is None
        return {'extra_src': ctx.source_logits.mean() * 0 + 1.0}
    def after_mixed(self, ctx):
        self.seen['mixed'] = (ctx.mixed, ctx.pseudo)
        return {'extra_mix': ctx.mixed_logits.mean() * 0 + 2.0}
    def extra_losses(self, ctx):
        out = ctx.student(ctx.batch.target_image)            # an own forward pass, like MIC's
        return {'extra_own': out.logits.float().mean() * 0 + 3.0}

def test_component_hooks(model):
    m = copy.deepcopy(model); t = copy.deepcopy(model).requires_grad_(False)
    rec = Recorder()
    out = uda_step(m, t, make_batch(), 0, DACS.step, PlainCriterion(), [rec], torch.Generator().manual_seed(0))
    assert rec.seen['source'] and rec.seen['mixed'][0] is not None
    assert {k: out.losses[k].item() for k in ('extra_src', 'extra_mix', 'extra_own')} == \
        {'extra_src': 1.0, 'extra_mix': 2.0, 'extra_own': 3.0}
    with pytest.raises(ValueError, match='extra_src'):
        uda_step(m, t, make_batch(), 0, DACS.step, PlainCriterion(), [rec, Recorder()])

def test_is_target_reaches_blda_even_with_pseudo_weight_one(model):
    """The explicit ClassMix domain goes to `BLDALoss.mixed`: the target grid is updated although every
    pseudo-weight is exactly 1 (the official code's `0 < w < 1` split would miss it, Woof6/BLDA's CrossEntropyLoss_GMM)."""
    m = copy.deepcopy(model); teacher = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad(): teacher.head.classifier.bias[3] = 100.0       # a teacher sure of class 3 everywhere
    criterion = BLDALoss(LogitTracker(19, min_pixels=10), cdf_weight=0.2)
    seen = {}
    real_mixed = criterion.mixed
    def spy(logits, labels, is_target, weight=None, cdf_pred=None):
        seen.update(is_target=is_target, weight=weight, labels=labels)
        return real_mixed(logits, labels, is_target, weight, cdf_pred)
    criterion.mixed = spy
    batch, g = make_batch(2), torch.Generator().manual_seed(7)
    expected = ~classmix_masks(batch.source_label, 'batch', generator=torch.Generator().manual_seed(7))
    uda_step(m, teacher, batch, 0, DACS.step, criterion, generator=g)
    assert torch.equal(seen['is_target'], expected)
    assert (seen['weight'] == 1).all()                                   # every pixel weighs 1 ...
    assert (seen['labels'][expected] == 3).all()
    est = criterion.tracker.estimated('target')
    assert est[3].all() and est.sum() == 19                              # ... yet the target row of class 3 is fitted

def test_blda_gradient_flows_only_through_logits(model):
    "The BLDA source loss has the gradient of plain CE on (logits − τΔ) with Δ a constant; the CDF target is detached."
    m = copy.deepcopy(model).eval()                                      # no dropout: two forwards agree
    batch = make_batch(3)
    tracker = LogitTracker(19, min_pixels=5)
    with torch.no_grad():
        z0 = upsample(m(batch.source_image).logits, (H, W))
        for k in range(3): tracker.update(z0 + 0.3 * k, batch.source_label, 'source')
    tau = 0.5
    params = [p for p in m.parameters()]
    out = m(batch.source_image)
    z = upsample(out.logits, (H, W))
    loss = BLDALoss(tracker, tau=tau, cdf_weight=0.0, update=False).source(z, batch.source_label).total
    g_blda = torch.autograd.grad(loss, params, allow_unused=True)
    delta = tracker.shift(z.detach(), batch.source_label, 'source').delta
    assert delta.abs().sum() > 0
    z2 = upsample(m(batch.source_image).logits, (H, W))
    ref = F.cross_entropy(z2 - tau * delta, batch.source_label, reduction='mean')
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    for a, b in zip(g_blda, g_ref):
        assert (a is None) == (b is None)
        if a is not None: assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    # the cumulative-density loss reaches the CDF head, never the logits
    out = m(batch.source_image)
    z, cdf = upsample(out.logits, (H, W)), upsample(out.cdf, (H, W))
    cdf_loss = BLDALoss(tracker, tau=tau, cdf_weight=1.0, update=False).source(z, batch.source_label, cdf).cdf
    assert cdf_loss > 0
    assert torch.autograd.grad(cdf_loss, z, allow_unused=True)[0] is None
    assert torch.autograd.grad(cdf_loss, m.head.conv_cdf.weight)[0].abs().sum() > 0

# ------------------------------------------------------------------------------------------ pseudo-labels, FD
def test_teacher_pseudo_labels_crops(model):
    t = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad(): t.head.classifier.bias[0] = 100.0
    image = torch.randn(2, 3, H, W)
    pl = teacher_pseudo_labels(t, image, StepConfig(pseudo_crop_rows=(2, 5)))
    assert (pl.weight[:, :2] == 0).all() and (pl.weight[:, -5:] == 0).all() and (pl.weight[:, 2:-5] == 1).all()
    valid = torch.ones(2, H, W, dtype=torch.bool); valid[:, :, :4] = False
    pl = teacher_pseudo_labels(t, image, StepConfig(), valid)
    assert (pl.weight[..., :4] == 0).all() and (pl.weight[..., 4:] == 1).all()
    assert t.training and not t.head.dropout.training                   # reference: train mode, dropout off
    teacher_pseudo_labels(t, image, StepConfig(teacher_mode='eval'))
    assert not t.training

def test_feature_distance_component(model):
    m = copy.deepcopy(model)
    fd = DAFORMER.build_components(m)[0]
    assert isinstance(fd, FeatureDistance) and not fd.reference.training
    fd.train()
    assert not fd.reference.training                                     # the ImageNet model stays in eval
    state = fd.checkpoint_state()
    assert set(state) == {'fingerprint'}
    fd.load_checkpoint_state(state)
    with torch.no_grad(): next(m.parameters()).add_(1.0)
    with pytest.raises(ValueError, match='feature-distance'):
        FeatureDistance(m).load_checkpoint_state(state)
    # a step on all-"car" labels gives a positive FD once the student has moved, zero before
    batch = make_batch(); batch.source_label.fill_(13)
    fresh = copy.deepcopy(model).eval()                                  # eval: no DropPath, like the reference copy
    comps = DAFORMER.build_components(fresh)
    out = uda_step(fresh, None, batch, 0, SOURCE_ONLY.step, PlainCriterion(), comps)
    assert out.losses['fd'] < 1e-6
    out = uda_step(m, None, batch, 0, SOURCE_ONLY.step, PlainCriterion(), [FeatureDistance(model)])
    assert out.losses['fd'] > 0

def test_ema_order(model):
    "update_teacher at iteration 0 copies; later it moves by 1 − α_t."
    s, t = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in s.parameters(): p.add_(1.0)
    assert update_teacher(t, s, 0, DACS.step) == 0
    assert all(torch.equal(a, b) for a, b in zip(t.parameters(), s.parameters()))
    assert update_teacher(t, s, 1000, DAFORMER.step) == 0.999


def test_stopwatch_gpu_path_sums_event_pairs(monkeypatch):
    "On a GPU the stopwatch records an event pair per section, waits only for the last event, and sums the spans."
    from blda.uda import Stopwatch
    log = []
    class FakeEvent:   # stands in for torch.cuda.Event: elapsed_time is the difference of record ticks (ms)
        clock = 0
        def __init__(self, enable_timing=False): assert enable_timing; self.t = None
        def record(self): FakeEvent.clock += 5; self.t = FakeEvent.clock
        def synchronize(self): log.append(self.t)
        def elapsed_time(self, end): return end.t - self.t
    monkeypatch.setattr(torch.cuda, 'Event', FakeEvent)
    watch = Stopwatch('cuda')
    for _ in range(3):
        with watch.section('criterion'): pass       # each pair spans 5 ticks
    assert watch.read() == {'criterion': pytest.approx(0.015)} and log == [30]   # 3 × 5 ms; one wait, on the last event
    assert watch.read() == {}
