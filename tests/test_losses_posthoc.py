"BLDALoss wiring, gradient paths, and the theorem behind the method by simulation (posthoc)."
import torch
import torch.nn.functional as F
from blda.adjust import posthoc, posthoc_direct
from blda.losses import BLDALoss, balanced_cross_entropy
from blda.metrics import class_bias, confusion_matrix
from blda.tracker import LogitTracker


def biased_logits(n, offsets, gen, C):
    "z_l ~ N(1 + o_l, 1) on the own class, N(−1 + o_l, 1) otherwise; labels uniform."
    y = torch.randint(0, C, (1, 1, n), generator=gen)
    o = torch.tensor(offsets)[:, None, None]
    own = torch.arange(C)[None, :, None, None] == y[:, None]
    return torch.where(own, 1 + o, -1 + o) + torch.randn(1, C, 1, n, generator=gen), y


def trained_tracker(offsets, C, gen, steps=60):
    t = LogitTracker(C, warmup=20, min_pixels=50)
    for _ in range(steps):
        z, y = biased_logits(4096, offsets, gen, C)
        t.update(z, y, 'source'); t.update(z, y, 'target')
    return t


def test_theorem_by_simulation():
    C = 6
    g = torch.Generator().manual_seed(0); torch.manual_seed(0)
    # aligned distributions: every class has the same positive and negative law → no bias
    z, y = biased_logits(60000, [0.0] * C, g, C)
    assert class_bias(confusion_matrix(z.argmax(1), y, C)).abs().max() < 0.01
    # a planted over-predicted class
    offsets = [1.5, 0, 0, 0, 0, -1.0]
    z, y = biased_logits(60000, offsets, g, C)
    raw = class_bias(confusion_matrix(z.argmax(1), y, C))
    assert raw[0] > 0.1 and raw[5] < -0.05
    tracker = trained_tracker(offsets, C, g)
    fixed = class_bias(confusion_matrix(posthoc(z, tracker, tau=1.0).argmax(1), y, C))
    assert fixed.abs().max() < 0.3 * raw.abs().max()


def test_posthoc_chunked_equals_direct():
    g = torch.Generator().manual_seed(1); torch.manual_seed(1)
    tracker = trained_tracker([1.0, 0, -1.0, 0.5], 4, g, steps=20)
    z = torch.randn(2, 4, 5, 7, generator=g) * 3
    ref = posthoc_direct(z, tracker, tau=0.4)
    for chunk in (1, 13, 70, 10000):
        assert torch.allclose(posthoc(z, tracker, tau=0.4, chunk_pixels=chunk), ref, atol=1e-5)
    assert torch.allclose(posthoc(z, tracker, tau=0.0), z.softmax(1), atol=1e-6)


def test_posthoc_compiled_equals_eager():
    "The torch.compile path (the default on CUDA) gives the eager scores; compiled here on the CPU."
    g = torch.Generator().manual_seed(2); torch.manual_seed(2)
    tracker = trained_tracker([1.0, 0, -1.0, 0.5], 4, g, steps=20)
    z = torch.randn(1, 4, 6, 9, generator=g) * 3
    assert torch.allclose(posthoc(z, tracker, tau=0.4, compile=True), posthoc(z, tracker, tau=0.4, compile=False), atol=1e-5)


def test_mixed_batch_uses_the_explicit_domain_mask():
    # All pseudo-labels confident (weight exactly 1): the official weight==1 rule would file every target
    # pixel as source and never update the target grid (Woof6/BLDA's CrossEntropyLoss_GMM).
    g = torch.Generator().manual_seed(2); torch.manual_seed(2)
    tracker = LogitTracker(3, warmup=5, min_pixels=20)
    loss = BLDALoss(tracker, tau=0.1, cdf_weight=0.2)
    z, y = biased_logits(2048, [0, 0, 0], g, 3)
    loss.source(z, y)
    is_target = torch.zeros_like(y, dtype=torch.bool); is_target[..., 1024:] = True
    terms = loss.mixed(z, y, is_target, weight=torch.ones_like(z[:, 0]), cdf_pred=torch.zeros(1, 1, 1, 2048))
    assert tracker.estimated('target').any()
    assert torch.isfinite(terms.total) and terms.cdf > 0
    # the source half was shifted with the source grid, the target half with the target grid
    s = tracker.shift(z, y, is_target)
    assert torch.allclose(s.delta[..., :1024], tracker.delta(z, y, 'source')[..., :1024])
    assert torch.allclose(s.delta[..., 1024:], tracker.delta(z, y, 'target')[..., 1024:])


def test_gradients_reach_the_model_only_through_the_logits():
    g = torch.Generator().manual_seed(3); torch.manual_seed(3)
    tracker = LogitTracker(3, warmup=5, min_pixels=20)
    loss = BLDALoss(tracker, tau=0.5, cdf_weight=0.2)
    z, y = biased_logits(2048, [1, 0, -1], g, 3)
    for _ in range(3): loss.source(z, y)
    logits = z.clone().requires_grad_(True)
    cdf_pred = torch.zeros(1, 1, 1, 2048, requires_grad=True)
    terms = loss.source(logits, y, cdf_pred)
    terms.total.backward()
    delta = tracker.delta(z, y, 'source')
    ref_logits = z.clone().requires_grad_(True)
    F.cross_entropy(ref_logits - 0.5 * delta, y, ignore_index=255).backward()
    assert torch.allclose(logits.grad, ref_logits.grad, atol=1e-7)       # CE gradient as if Δ were a constant
    assert cdf_pred.grad.abs().sum() > 0                                  # the head learns from the CDF loss only
    assert torch.allclose(balanced_cross_entropy(z, y, delta, tau=0.0), F.cross_entropy(z, y))


def test_mixed_tau_adjusts_the_mixed_batch_alone():
    "`mixed_tau=0` (the paper's OLA_S ablation): the source CE is adjusted, the mixed one is plain; the tracker still learns both."
    g = torch.Generator().manual_seed(4); torch.manual_seed(4)
    z, y = biased_logits(2048, [1, 0, -1], g, 3)
    is_target = torch.zeros_like(y, dtype=torch.bool); is_target[..., 1024:] = True
    w = torch.where(is_target, 0.7, 1.0)
    ola, ola_s = (BLDALoss(LogitTracker(3, warmup=5, min_pixels=20), tau=0.5, cdf_weight=0.0, mixed_tau=m) for m in (None, 0.0))
    for loss in (ola, ola_s):
        torch.manual_seed(5)   # the same pixel samples for both trackers
        for _ in range(3): loss.source(z, y); loss.mixed(z, y, is_target, w)
    states = [loss.tracker.state_dict() for loss in (ola, ola_s)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])       # mixed_tau changes no update
    ola.update = ola_s.update = False
    assert torch.equal(ola.source(z, y).ce, ola_s.source(z, y).ce)               # nor the source loss
    plain = balanced_cross_entropy(z, y, None, 0.0, w)
    assert torch.allclose(ola_s.mixed(z, y, is_target, w).ce, plain)
    assert not torch.allclose(ola.mixed(z, y, is_target, w).ce, plain)           # with mixed_tau None the mixed CE is shifted
    assert ola_s.tracker.estimated('target').all()
