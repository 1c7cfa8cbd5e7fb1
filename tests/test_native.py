"""The fused CPU kernels (`blda.native`) against the PyTorch reference code, their determinism, and the fallback.

On the CPU the tracker runs EM and the shift Δ in C kernels (`nbs/08_native.ipynb`), a second copy of the
PyTorch formulas of `blda.gmm` and `blda.tracker`. Edit one copy alone and the comparisons here fail with a
message that says so (`KERNELS_TOO`); the last two tests check that they do."""
import os
import warnings
import pytest
import torch
from blda import native
from blda.gmm import em_fit, init_from_quantiles
from blda.tracker import LogitTracker

needs_kernels = pytest.mark.skipif(native.kernels().library is None, reason='the CPU kernels did not build here')

KERNELS_TOO = ("the fused C kernels (blda.native) no longer compute what the PyTorch code computes. They are a second "
               "copy of the formulas of blda.gmm (em_fit's E-step and moments) and blda.tracker (shift, _shift_chunk): "
               "when you change a formula in nbs/02_gmm.ipynb or nbs/03_tracker.ipynb, make the same change to the C "
               "kernels in nbs/08_native.ipynb. To run the PyTorch code alone meanwhile: BLDA_NATIVE=0, or "
               "LogitTracker(native=False) / em_fit(native=False)")


def assert_agree(what: str, fused: torch.Tensor, plain: torch.Tensor, **tolerance) -> None:
    "The C kernels' `fused` result is close to the PyTorch code's `plain` one; otherwise a message saying what to edit."
    gap = (fused.double() - plain.double()).abs().max().item() if fused.numel() else 0.0
    assert torch.allclose(fused, plain, **tolerance), f"{what}: max |C − PyTorch| = {gap:.3g}. {KERNELS_TOO}"


def assert_em_agrees(fused, plain) -> None:
    for field, a, b in zip(fused._fields, fused, plain): assert_agree(f"em_fit {field}", a, b, rtol=1e-4, atol=1e-4)


def assert_shift_agrees(fused, plain) -> None:
    assert_agree("shift Δ", fused.delta, plain.delta, atol=2e-5)
    assert_agree("shift label CDF", fused.label_cdf, plain.label_cdf, atol=1e-6)
    assert torch.equal(fused.label_estimated, plain.label_estimated), f"shift label_estimated differs. {KERNELS_TOO}"


def em_problem():
    "Samples, weights (some masked out) and a quantile start for 40 mixtures of 1500 samples."
    g = torch.Generator().manual_seed(0)
    E, N = 40, 1500                                                             # N not a multiple of the block of 64
    x = torch.randn(E, N, generator=g) * 2 + 3 * (torch.rand(E, N, generator=g) < 0.3) + torch.linspace(-20, 20, E)[:, None]
    sw = torch.rand(E, N, generator=g) * (torch.rand(E, N, generator=g) < 0.9)   # weights, some samples masked out
    return x, sw, init_from_quantiles(x, sw, 5)


def trained_tracker(C=5, B=3, H=7, W=13, seed=0, steps=6, **kw):
    "A tracker fitted on random blocky logits (both domains), with one pair never estimated, and a test batch."
    g = torch.Generator().manual_seed(seed); torch.manual_seed(seed)
    tracker = LogitTracker(C, warmup=3, min_pixels=10, **kw)
    for _ in range(steps):
        y = torch.randint(0, C, (B, H, W), generator=g)
        z = 2.5 * torch.nn.functional.one_hot(y, C).permute(0, 3, 1, 2).float() + torch.randn(B, C, H, W, generator=g)
        tracker.update(z, y, 'source'); tracker.update(z, y, 'target')
    tracker.source_updates[1, 2] = 0
    y = torch.randint(0, C, (B, H, W), generator=g)
    y[0, :2] = 255                                                              # unlabelled pixels
    z = 2.5 * torch.nn.functional.one_hot(y.clamp(max=C - 1), C).permute(0, 3, 1, 2).float() + 1.5 * torch.randn(B, C, H, W, generator=g)
    return tracker, z, y


@needs_kernels
def test_em_fit_native_matches_pytorch_and_is_closer_to_float64():
    x, sw, start = em_problem()
    fused, plain = em_fit(x, sw, start, 3, native=True), em_fit(x, sw, start, 3, native=False)
    exact = em_fit(x.double(), sw.double(), start._replace(**{f: getattr(start, f).double() for f in start._fields}), 3)
    assert_em_agrees(fused, plain)
    for f, a, b, e in zip(start._fields, fused, plain, exact):
        assert (a.double() - e).abs().max() <= 2 * (b.double() - e).abs().max() + 1e-6, f


@needs_kernels
def test_em_moments_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(1)
    x, sw = torch.randn(3, 20000, generator=g), torch.rand(3, 20000, generator=g)   # split into 5 work items each
    r, bias, const = torch.rand(3, 4, generator=g) + 0.5, torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    threads, runs = torch.get_num_threads(), []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n); runs.append(native.em_moments(x, sw, r, bias, const))
    finally: torch.set_num_threads(threads)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@needs_kernels
@pytest.mark.parametrize('domain', ['source', 'target', 'mask'])
def test_shift_native_matches_pytorch(domain):
    tracker, z, y = trained_tracker()
    reference = LogitTracker(5, native=False)
    reference.load_state_dict(tracker.state_dict())
    source_rows = torch.ones_like(y, dtype=torch.bool) if domain == 'source' else torch.zeros_like(y, dtype=torch.bool)
    if domain == 'mask':
        domain = torch.rand(y.shape, generator=torch.Generator().manual_seed(5)) < 0.5
        source_rows = ~domain
    assert tracker.uses_native(z) and not reference.uses_native(z)
    a, b = tracker.shift(z, y, domain), reference.shift(z, y, domain)
    assert_shift_agrees(a, b)
    assert a.delta[:, 2][(y == 1) & source_rows].eq(0).all() and a.delta[0, :, :2].eq(0).all()   # not estimated, unlabelled
    assert a.delta[:, 2][(y == 1) & ~source_rows].ne(0).all()
    assert a.delta.is_contiguous() and a.delta.shape == z.shape


@needs_kernels
def test_a_pixels_shift_does_not_depend_on_the_rest_of_the_batch():
    tracker, z, y = trained_tracker(B=2, H=40, W=50)
    perm = torch.randperm(2 * 40 * 50, generator=torch.Generator().manual_seed(3))
    flat_z, flat_y = z.permute(1, 0, 2, 3).reshape(5, -1), y.reshape(-1)
    whole = tracker.shift(z, y, 'source')
    shuffled = tracker.shift(flat_z[:, perm].reshape(5, 1, 1, -1).permute(1, 0, 2, 3), flat_y[perm].reshape(1, 1, -1), 'source')
    assert torch.equal(shuffled.delta.reshape(5, -1), whole.delta.permute(1, 0, 2, 3).reshape(5, -1)[:, perm])
    assert torch.equal(shuffled.label_cdf.reshape(-1), whole.label_cdf.reshape(-1)[perm])


@needs_kernels
def test_training_steps_agree_with_the_pytorch_tracker():
    "Same pixels sampled (same random state), then fits and shifts that agree to rounding."
    fused, plain = LogitTracker(4, warmup=2, min_pixels=10), LogitTracker(4, warmup=2, min_pixels=10, native=False)
    g = torch.Generator().manual_seed(4)
    for it in range(5):
        y = torch.randint(0, 4, (2, 16, 16), generator=g)
        z = 3 * torch.nn.functional.one_hot(y, 4).permute(0, 3, 1, 2).float() + torch.randn(2, 4, 16, 16, generator=g)
        for t in (fused, plain):
            torch.manual_seed(it); t.update(z, y, 'source')
    for (name, a), b in zip(fused.state_dict().items(), plain.state_dict().values()):
        assert_agree(f"tracker state {name} after 5 updates", a.float(), b.float(), rtol=1e-4, atol=1e-4)
    assert_agree("Δ after 5 updates", fused.delta(z, y, 'source'), plain.delta(z, y, 'source'), atol=1e-4)


def test_without_a_compiler_the_tracker_warns_once_and_runs_on_pytorch(monkeypatch, tmp_path):
    monkeypatch.setenv('CC', 'no-such-compiler')
    monkeypatch.setenv('BLDA_CACHE', str(tmp_path))
    native.kernels.cache_clear()
    try:
        with pytest.warns(UserWarning, match='no-such-compiler'):
            tracker, z, y = trained_tracker(steps=2)
        assert not tracker.uses_native(z) and tracker.estimated('source').any()
        with warnings.catch_warnings():
            warnings.simplefilter('error')                                     # the warning came once
            tracker.shift(z, y, 'source')
        with pytest.raises(RuntimeError, match='native=True.*no-such-compiler'):
            LogitTracker(5, native=True).update(z, y, 'source')
        with pytest.raises(ValueError, match='native=True'):
            em_fit(z[0].reshape(5, -1), torch.ones(5, 91), init_from_quantiles(z[0].reshape(5, -1), torch.ones(5, 91), 3), native=True)
        assert list(tmp_path.iterdir()) == []                                   # nothing half-built left behind
    finally:
        monkeypatch.undo()
        native.kernels.cache_clear()


def test_blda_native_0_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv('BLDA_NATIVE', '0')
    native.kernels.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            assert native.kernels().library is None and 'BLDA_NATIVE' in native.kernels().reason
            assert not LogitTracker(3).uses_native(torch.zeros(1))
    finally:
        monkeypatch.undo()
        native.kernels.cache_clear()


@needs_kernels
def test_build_is_cached_and_leaves_denormals_alone(tmp_path):
    first = native.build_kernels(directory=tmp_path)
    files = list(tmp_path.iterdir())
    assert first.library is not None and len(files) == 1 and files[0].suffix == '.so'
    stamp = files[0].stat().st_mtime_ns
    again = native.build_kernels(directory=tmp_path)
    assert again.library is not None and files[0].stat().st_mtime_ns == stamp   # reused, not rebuilt
    assert torch.tensor([1e-40]).mul(1.0).item() != 0                          # the process does not flush denormals


@needs_kernels
def test_kernel_entry_points_reject_what_would_read_out_of_bounds():
    C, R, K = 3, 7, 2
    logits, coef, table = torch.zeros(1, C, 2, 2), torch.zeros(R, C, K, 3), torch.zeros(2, 16)
    defined, row_label = torch.ones(R, C, dtype=torch.bool), torch.arange(R) % C
    with pytest.raises(ValueError, match=r'rows must lie in \[0, 7\)'):
        native.shift(logits, torch.tensor([0, 1, 2, 7]), row_label, coef, defined, table, 0.01)
    with pytest.raises(ValueError, match='shapes do not fit'):
        native.shift(logits, torch.tensor([0, 1, 2]), row_label, coef, defined, table, 0.01)
    with pytest.raises(ValueError, match='xc must be a torch.float32 CPU tensor'):
        native.em_moments(torch.zeros(2, 5, dtype=torch.float64), torch.ones(2, 5), *torch.zeros(3, 2, K))


@needs_kernels
def test_an_edit_of_the_pytorch_shift_alone_fails_and_says_where_to_edit(monkeypatch):
    "A changed `_shift_chunk` (the PyTorch Δ) without the same change in the C kernels fails, naming nbs/08_native.ipynb."
    import blda.tracker as tracker_module
    tracker, z, y = trained_tracker()
    reference = LogitTracker(5, native=False)
    reference.load_state_dict(tracker.state_dict())
    assert_shift_agrees(tracker.shift(z, y, 'source'), reference.shift(z, y, 'source'))   # before the edit
    original = tracker_module._shift_chunk
    monkeypatch.setattr(tracker_module, '_shift_chunk', lambda *a: original(*a)._replace(delta=1.01 * original(*a).delta))
    with pytest.raises(AssertionError, match=r'shift Δ.*nbs/08_native\.ipynb'):
        assert_shift_agrees(tracker.shift(z, y, 'source'), reference.shift(z, y, 'source'))


@needs_kernels
def test_an_edit_of_the_pytorch_em_step_alone_fails_and_says_where_to_edit(monkeypatch):
    "A changed E-step in `em_fit`'s PyTorch path (its softmax) without the same change in the C kernels fails, naming nbs/08_native.ipynb."
    x, sw, start = em_problem()
    softmax = torch.softmax
    monkeypatch.setattr(torch, 'softmax', lambda t, dim: softmax(1.05 * t, dim))   # the PyTorch path's E-step only
    with pytest.raises(AssertionError, match=r'em_fit .*nbs/08_native\.ipynb'):
        assert_em_agrees(em_fit(x, sw, start, 3, native=True), em_fit(x, sw, start, 3, native=False))
