"""Checks that need a CUDA device; skipped elsewhere (CI has none). Run them on a GPU machine with
`make gpu-check`, which also runs the GPU benchmark. Each compares the GPU's way of computing something
(broadcast EM, scatter counts, the static compiled update, compiled kernels) with the CPU's or the eager one."""
import pytest
import torch
from blda.adjust import posthoc
from blda.benchmark import run_benchmark, synthetic_batch
from blda.gmm import Mixture, em_fit, init_from_quantiles, value_counts
from blda.tracker import LogitTracker

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


def _batch(size=64, seed=0):
    return synthetic_batch(2, 19, size, size, 'cpu', torch.Generator().manual_seed(seed))


def _fitted() -> LogitTracker:
    "A CPU tracker whose every estimable pair has been fitted."
    logits, labels = _batch()
    tracker = LogitTracker(19, warmup=10)
    for _ in range(3):
        tracker.update(logits, labels, 'source'); tracker.update(logits, labels, 'target')
    return tracker


@pytest.mark.parametrize('compile', [False, True], ids=['eager', 'compiled'])
def test_shift_and_posthoc_agree_between_cpu_and_gpu(compile):
    "The same tracker state gives the same Δ, label CDF and post-hoc scores on both devices."
    cpu = _fitted()
    gpu = LogitTracker(19, warmup=10, compile=compile).cuda()
    gpu.load_state_dict(cpu.state_dict())
    logits, labels = _batch(seed=1)
    is_target = torch.zeros_like(labels, dtype=torch.bool); is_target[..., 32:] = True
    for domain in ('source', is_target):
        a = cpu.shift(logits, labels, domain)
        b = gpu.shift(logits.cuda(), labels.cuda(), domain if isinstance(domain, str) else domain.cuda())
        assert torch.equal(a.label_estimated, b.label_estimated.cpu())
        assert (a.delta - b.delta.cpu()).abs().max() < 1e-4
        assert (a.label_cdf - b.label_cdf.cpu()).abs().max() < 1e-5
    scores = posthoc(logits.cuda(), gpu, tau=0.2, compile=compile).cpu()
    assert (scores - posthoc(logits, cpu, tau=0.2)).abs().max() < 1e-5


def test_broadcast_em_matches_the_cpu_products():
    "EM by broadcasts (the GPU's way) fits what the CPU's batched products fit, from the same start."
    g = torch.Generator().manual_seed(3)
    x = torch.randn(304, 1024, generator=g) * 2 + 1
    sw = (torch.rand(304, 1024, generator=g) > 0.1).float()
    start = init_from_quantiles(x, sw, 5)
    cpu = em_fit(x, sw, start, steps=3)
    gpu = em_fit(x.cuda(), sw.cuda(), Mixture(*(t.cuda() for t in start)), steps=3)
    for name, a, b in zip(('weights', 'means', 'variances'), cpu, gpu):
        assert (a - b.cpu()).abs().max() < 1e-4, name


def test_scatter_counts_match_bincount():
    values = torch.randint(0, 20, (100_000,))
    assert torch.equal(value_counts(values.cuda(), 20).cpu(), torch.bincount(values, minlength=20))


def test_static_compiled_update_matches_the_dynamic_one_on_the_gpu():
    """From the same CUDA random state the compiled static update (the GPU default) picks the same pixels and
    fits the same mixtures as the eager dynamic update: same counters, parameters up to rounding."""
    logits, labels = (t.cuda() for t in _batch())
    weight = torch.rand(labels.shape, device='cuda')
    dynamic = LogitTracker(19, warmup=3, static=False, compile=False).cuda()
    static = LogitTracker(19, warmup=3).cuda()
    assert static.uses_static(logits) and not dynamic.uses_static(logits)
    for step in range(3):
        for domain, w in (('source', None), ('target', weight)):
            rng = torch.cuda.get_rng_state(); dynamic.update(logits, labels, domain, w)
            torch.cuda.set_rng_state(rng); static.update(logits, labels, domain, w)
    for (k, a), b in zip(dynamic.state_dict().items(), static.state_dict().values()):
        if a.dtype == torch.long: assert torch.equal(a, b), k
        else: assert (a - b).abs().max() < 1e-4, k


def test_gpu_benchmark_runs_and_reports():
    "`blda benchmark --device cuda` at a small size: every number is there and the compiled post-hoc matches."
    r = run_benchmark('cuda', 2, 19, 128, 128, (128, 256), repeats=3)
    assert r['static'] and r['compiled_steps']
    for key in ('plain_ce_ms', 'blda_source_ms', 'blda_mixed_ms', 'update_ms', 'shift_ms', 'posthoc_ms'):
        assert r[key] > 0, key
    for key in ('plain_ce_peak_mib', 'blda_source_peak_mib', 'blda_mixed_peak_mib', 'posthoc_peak_extra_mib'):
        assert r[key] is not None and r[key] >= 0, key
    assert 'posthoc_compiled_error' not in r and r['posthoc_compiled_max_abs_diff'] < 1e-4
