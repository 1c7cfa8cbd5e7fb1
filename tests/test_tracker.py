"LogitTracker: recovery of known distributions, alignment, official momentum semantics, checkpoints, DDP."
import os
import pytest
import torch
import torch.multiprocessing as mp
from scipy.stats import kstest, ks_2samp
from blda.gmm import mixture_cdf
from blda.tracker import LogitTracker, sample_per_class

MEANS = torch.tensor([[4.0, -2.0, -6.0], [-1.0, 2.0, -3.0], [0.0, -4.0, 1.0]])   # E[z_l | y = c]
SCALES = torch.tensor([[1.0, 2.0, 0.5], [1.5, 0.7, 1.0], [2.0, 1.0, 1.2]])


def stream(n, gen, bimodal=False):
    "Logits (1, 3, 1, n) with z_l | y=c ~ N(MEANS[c,l], SCALES[c,l]²) (+ a second mode if bimodal)."
    y = torch.randint(0, 3, (1, 1, n), generator=gen)
    eps = torch.randn(3, n, generator=gen)
    z = MEANS[y[0, 0]].T + SCALES[y[0, 0]].T * eps
    if bimodal: z = z + 4.0 * (torch.rand(3, n, generator=gen) < 0.3)
    return z[None, :, None], y


def fitted(tracker, steps=150, n=4096, seed=0, domain='source', **kw):
    g = torch.Generator().manual_seed(seed); torch.manual_seed(seed)
    for _ in range(steps):
        z, y = stream(n, g, **kw)
        tracker.update(z, y, domain)
    return g


def test_recovers_every_pair_probability_integral_transform():
    tracker = LogitTracker(3, warmup=30, min_pixels=50)
    g = fitted(tracker, bimodal=True)
    z, y = stream(20000, g, bimodal=True)
    mix = tracker.mixture('source')
    for c in range(3):
        for l in range(3):
            sample = z[0, l, 0, y[0, 0] == c]
            u = mixture_cdf(sample, *(t[c, l] for t in mix))
            assert kstest(u.numpy(), 'uniform').statistic < 0.03, (c, l)


@pytest.mark.parametrize('pooling', ['pixel', 'class'])
def test_shift_aligns_all_classes(pooling):
    tracker = LogitTracker(3, warmup=30, min_pixels=50, anchor_pooling=pooling)
    g = fitted(tracker)
    z, y = stream(30000, g)
    aligned = (z + tracker.delta(z, y, 'source'))[0, :, 0]
    yy = y[0, 0]
    pos = [aligned[c, yy == c].numpy() for c in range(3)]
    neg = [aligned[l, (yy != l)].numpy() for l in range(3)]
    assert max(ks_2samp(pos[0], p).statistic for p in pos[1:]) < 0.05
    assert max(ks_2samp(neg[0], p).statistic for p in neg[1:]) < 0.05


def test_delta_is_zero_where_not_estimated_or_ignored():
    tracker = LogitTracker(3, warmup=5, min_pixels=50)
    z = torch.randn(1, 3, 4, 64); y = torch.randint(0, 2, (1, 4, 64))     # class 2 never seen
    assert (tracker.delta(z, y, 'source') == 0).all()                       # nothing estimated yet
    for _ in range(3): tracker.update(z, y, 'source')
    y2 = y.clone(); y2[0, 0] = 2; y2[0, 1] = 255
    s = tracker.shift(z, y2, 'source')
    assert (s.delta[0, :, 0] == 0).all() and (s.delta[0, :, 1] == 0).all()
    assert (s.delta[0, :, 2:] != 0).any()
    assert not s.label_estimated[0, :2].any() and s.label_estimated[0, 2:].all()
    assert (tracker.delta(z, y, 'target') == 0).all()                       # the target grid is separate


def test_min_pixels_ignore_and_zero_weight_are_not_sampled():
    tracker = LogitTracker(3, warmup=0, min_pixels=100)
    z = torch.randn(1, 3, 1, 1000)
    y = torch.zeros(1, 1, 1000, dtype=torch.long); y[..., 500:600] = 1; y[..., 600:650] = 2   # class 2: 50 < 100
    y[..., 900:] = 255; z[..., 900:] = 1e6                                                      # ignored garbage
    w = torch.ones(1, 1, 1000); w[..., 800:900] = 0; z[..., 800:900] = -1e6                     # zero-weight garbage
    tracker.update(z, y, 'source', weight=w)
    est = tracker.estimated('source')
    assert est[0].all() and est[1].all() and not est[2].any()
    assert tracker.mixture('source').means.abs().max() < 10


@pytest.mark.parametrize('static', [False, True], ids=['dynamic', 'static'])
def test_momentum_semantics_official(static):
    "Counters follow EMA_updata_weight: n = calls since the last update, i = calls; first fit taken as is."
    tracker = LogitTracker(2, warmup=4, min_pixels=10, em_steps=1, static=static)
    torch.manual_seed(0)
    both = torch.tensor([[[0] * 50 + [1] * 50]]); only0 = torch.zeros(1, 1, 100, dtype=torch.long)
    z = torch.randn(1, 2, 1, 100)
    tracker.update(z, both, 'source')
    first = tracker.mixture('source').means.clone()
    for _ in range(3): tracker.update(z, only0, 'source')
    assert tracker.source_steps.item() == 4
    assert tracker.source_stale[1].tolist() == [4.0, 4.0] and tracker.source_stale[0].tolist() == [1.0, 1.0]
    assert tracker.source_updates.tolist() == [[4, 4], [1, 1]]
    assert torch.equal(tracker.mixture('source').means[1], first[1])        # untouched while absent
    # the next update of class 1 blends with weight (0.99 · min(4/4, 1))^4 on the old parameters
    old = tracker.mixture('source').means[1].clone()
    z2 = torch.randn(1, 2, 1, 100) + 3
    tracker.update(z2, both, 'source')
    keep = 0.99 ** 4
    new = tracker.mixture('source').means[1]
    fit = (new - keep * old) / (1 - keep)                                   # the EM fit implied by the blend
    assert (fit - old).abs().max() > 1.0 and torch.allclose(keep * old + (1 - keep) * fit, new)


def test_sample_per_class_is_uniform_and_respects_sizes():
    torch.manual_seed(0)
    labels = torch.tensor([0] * 10 + [1] * 1000 + [3] * 5)                  # 3 = "not sampled" for C = 3
    counts = torch.zeros(10, dtype=torch.long)
    for _ in range(2000):
        idx, real = sample_per_class(labels, torch.tensor([3, 5, 0]), 5)
        assert (labels[idx[0, :3]] == 0).all() and (labels[idx[1]] == 1).all() and not real[2].any()
        counts += torch.bincount(idx[0, :3], minlength=10)
    assert (counts - 600).abs().max() < 100                                # 2000 × 3 / 10 per pixel


def test_memory_layouts_give_the_same_state_and_shift():
    "Contiguous, channels-last and single-image logits: the flattening must not depend on the strides."
    g = torch.Generator().manual_seed(4)
    z = torch.randn(1, 3, 16, 24, generator=g) + 3 * torch.nn.functional.one_hot(
        torch.randint(0, 3, (1, 16, 24), generator=g), 3).permute(0, 3, 1, 2)
    y = z.argmax(1); y[0, :2] = 255
    results = []
    for logits in (z.contiguous(), z.contiguous(memory_format=torch.channels_last)):
        tracker = LogitTracker(3, warmup=2, min_pixels=10)
        torch.manual_seed(0)
        for _ in range(3): tracker.update(logits, y, 'source')
        results.append((tracker.state_dict(), tracker.shift(logits, y, 'source')))
    (s0, shift0), (s1, shift1) = results
    for k in s0: assert torch.allclose(s0[k].float(), s1[k].float(), atol=1e-6), k
    assert torch.allclose(shift0.delta, shift1.delta, atol=1e-5) and torch.equal(shift0.label_estimated, shift1.label_estimated)
    assert (shift0.delta[0, :, 2:] != 0).any() and (shift0.delta[0, :, :2] == 0).all()


def test_shift_does_not_depend_on_the_chunk_size():
    "Δ, the label CDF and its mask are per pixel: passes of 7 or 100 pixels give the one-pass result."
    tracker = LogitTracker(3, warmup=5, min_pixels=50)
    g = fitted(tracker, steps=10, n=2048)
    z, y = stream(333, g)
    y[0, 0, :5] = 255
    whole = tracker.shift(z, y, 'source')
    for chunk in (7, 100):
        tracker.chunk_pixels = chunk
        part = tracker.shift(z, y, 'source')
        assert torch.equal(part.delta, whole.delta) and torch.equal(part.label_cdf, whole.label_cdf)
        assert torch.equal(part.label_estimated, whole.label_estimated)
    assert (whole.delta != 0).any()


def test_checkpoint_restore_is_exact():
    a = LogitTracker(3, warmup=10, min_pixels=50)
    fitted(a, steps=20)
    b = LogitTracker(3, warmup=10, min_pixels=50)
    b.load_state_dict(a.state_dict())
    g1 = torch.Generator().manual_seed(9); g2 = torch.Generator().manual_seed(9)
    for t, g in ((a, g1), (b, g2)):
        torch.manual_seed(5)
        for _ in range(5):
            z, y = stream(2048, g)
            t.update(z, y, 'source'); t.update(z, y, 'target')
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    z, y = stream(512, g1)
    assert torch.equal(a.delta(z, y, 'source'), b.delta(z, y, 'source'))


def test_input_validation_messages():
    t = LogitTracker(3)
    with pytest.raises(ValueError, match='logits must be'):
        t.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), 'source')
    with pytest.raises(ValueError, match='labels must be'):
        t.update(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, dtype=torch.long), 'source')
    with pytest.raises(ValueError, match='domain'):
        t.update(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), 'tgt')
    with pytest.raises(ValueError, match='clamp'):
        LogitTracker(3, clamp=0.6)
    with pytest.raises(ValueError, match="static=True needs anchor_pooling='pixel'"):
        LogitTracker(3, anchor_pooling='class', static=True)


def _ddp_worker(rank, world, port, out_dir, static=False):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.manual_seed(100 + rank)                                           # ranks sample differently
    g = torch.Generator().manual_seed(rank)                                 # and see different data
    tracker = LogitTracker(3, warmup=5, min_pixels=50, static=static)   # static: the dynamic update runs under DDP
    for step in range(8):
        z, y = stream(1024 if rank == 0 else 700, g)
        if rank == 1 and step == 2: y[:] = 255                               # a rank with no labelled pixels
        tracker.update(z, y, 'source'); tracker.update(z, y, 'target')
    torch.save(tracker.state_dict(), os.path.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


@pytest.mark.parametrize('static', [False, True], ids=['dynamic', 'static'])
def test_ddp_ranks_stay_identical(tmp_path, static):
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path), static), nprocs=2, join=True)
    s0, s1 = (torch.load(tmp_path / f'rank{r}.pt') for r in range(2))
    assert s0['source_updates'].sum() > 0
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k


def test_compiled_kernels_match_eager():
    "The torch.compile path (the default on CUDA) computes the same state and shift as the eager one."
    g = torch.Generator().manual_seed(3)
    eager, fused = LogitTracker(3, warmup=5, min_pixels=20), LogitTracker(3, warmup=5, min_pixels=20, compile=True)
    for step in range(3):
        z, y = stream(1024, g)
        for t in (eager, fused):
            torch.manual_seed(step)
            t.update(z, y, 'source'); t.update(z, y, 'target')
    for (k, a), b in zip(eager.state_dict().items(), fused.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-4, rtol=1e-4), k
    z, y = stream(500, g)
    mask = torch.rand(y.shape, generator=g) < 0.5
    s_e, s_f = eager.shift(z, y, mask), fused.shift(z, y, mask)
    assert torch.allclose(s_e.delta, s_f.delta, atol=1e-4) and torch.equal(s_e.label_estimated, s_f.label_estimated)


def _static_and_dynamic(rule, compile=None, steps=4):
    "A dynamic and a static tracker (or two static ones, the second compiled) fed the same batches from the same random state."
    kw = dict(warmup=3, min_pixels=30, max_samples=64, samples_per_class=rule)   # 64 × 3 < P: the anchors subsample
    first = LogitTracker(3, static=compile is not None, **kw)
    second = LogitTracker(3, static=True, compile=compile, **kw)
    g = torch.Generator().manual_seed(5)
    for step in range(steps):
        z, y = stream(1024, g)
        if step == steps - 1: y[y == 2] = 255                              # a class absent from the last batch
        weight = torch.rand(y.shape, generator=g) * (torch.rand(y.shape, generator=g) > 0.2)
        for domain, w in (('source', None), ('target', weight)):
            rng = torch.get_rng_state(); first.update(z, y, domain, w)
            torch.set_rng_state(rng); second.update(z, y, domain, w)
    return first, second


@pytest.mark.parametrize('rule', ['min', 'all'])
def test_static_update_matches_dynamic(rule):
    "static=True picks the same pixels and fits the same mixtures as the dynamic update (up to rounding)."
    dynamic, static = _static_and_dynamic(rule)
    for (k, a), b in zip(dynamic.state_dict().items(), static.state_dict().values()):
        if a.dtype == torch.long: assert torch.equal(a, b), k
        else: assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), k
    assert dynamic.source_stale[2].tolist() == [2.0, 2.0, 2.0] and dynamic.source_stale[:2].eq(1).all()   # class 2 sat out


def test_static_update_compiles_to_one_graph():
    "The static update compiles with fullgraph=True (no graph break, no host sync) and matches its eager run."
    eager, fused = _static_and_dynamic('min', compile=True, steps=2)
    for (k, a), b in zip(eager.state_dict().items(), fused.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-4, rtol=1e-4), k


def test_static_update_is_the_default_for_compiled_gpu_trackers_only():
    "static=None takes the static update where it was measured faster: a GPU, compiled kernels, pooled anchors."
    from types import SimpleNamespace
    gpu, cpu = SimpleNamespace(is_cuda=True), torch.zeros(1)   # uses_static only reads the device of its argument
    assert LogitTracker(3).uses_static(gpu) and not LogitTracker(3).uses_static(cpu)
    assert not LogitTracker(3, compile=False).uses_static(gpu)
    assert not LogitTracker(3, anchor_pooling='class').uses_static(gpu)
    assert LogitTracker(3, static=True).uses_static(cpu) and not LogitTracker(3, static=False).uses_static(gpu)
