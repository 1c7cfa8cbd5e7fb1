"""`blda.hrda`: the multi-resolution student, the detail loss and the HRDA host (CPU, MiT-B0, tiny toy
benchmark at ×2, 64×64 context crops: the smallest for which MiT-B0's context branch still has a 32×32 input)."""
import copy, dataclasses, json, math, warnings
from pathlib import Path

import pytest

from conftest import assert_same_state, checked_train_log, train_once_and_resumed, train_quietly
import torch
import torch.nn.functional as F

from blda.cli import main
from blda.hrda import (HRDA, CropBox, DetailLoss, HRDAOutput, HRDAPart, HRDASegmentor, fuse, random_detail_box,
                       scale_attention_head)
from blda.losses import BLDALoss
from blda.models import build_model
from blda.selftrain import MixedBatch, disable_stochastic_layers
from blda.tracker import LogitTracker
from blda.registry import BENCHMARKS
from blda.train import HOSTS, TrainConfig, benchmark_margins, build_datasets, resolve_host
from blda.uda import PlainCriterion, StepConfig, StepContext, UDABatch, uda_step, update_teacher, upsample

def up(t, size):
    return F.interpolate(t, size=size, mode='bilinear', align_corners=False)

@pytest.fixture(scope='module')
def seg():
    "One small T segmentor with the density head (building a MiT costs seconds); tests copy it."
    torch.manual_seed(0)
    return build_model('T', 19, 'mit_b0', embed_dim=16, cdf_head=True)

# ------------------------------------------------------------------------------------------ boxes and fusion
def test_random_detail_box_offsets():
    g = torch.Generator().manual_seed(0)
    draws = {o: {random_detail_box(1024, 512, (512, 256), 8, o, g) for _ in range(3000)} for o in ('reference', 'uniform')}
    for o, boxes in draws.items():
        assert all(b.y0 % 8 == 0 and b.x0 % 8 == 0 and b.size == (512, 256) for b in boxes)
        assert max(b.y1 for b in boxes) <= 1024 and max(b.x1 for b in boxes) <= 512
    assert max(b.y0 for b in draws['reference']) == 504 and max(b.x0 for b in draws['reference']) == 248   # never 512 / 256
    assert max(b.y0 for b in draws['uniform']) == 512 and min(b.y0 for b in draws['uniform']) == 0
    assert random_detail_box(64, 32, (64, 16), 8, generator=g).y0 == 0          # zero margin on one side
    assert random_detail_box(64, 64, (64, 64)) == CropBox(0, 64, 0, 64)
    for bad in (dict(size=(80, 8)), dict(size=(0, 8)), dict(offsets='x'), dict(divisible=0)):
        with pytest.raises(ValueError): random_detail_box(64, 64, **(dict(size=(32, 32)) | bad))
    with pytest.raises(ValueError, match='grid'): CropBox(4, 36, 0, 32).scaled(8)

@pytest.mark.parametrize('order', ['reference', 'upsampled'])
@pytest.mark.parametrize('channels', [3, 1], ids=['classwise', 'single'])
def test_fuse_against_pixelwise_formula(order, channels):
    "Every fine-grid pixel of `fuse` against its formula, for boxes at several places, and without a box."
    g = torch.Generator().manual_seed(1)
    lr, a = torch.randn(2, 3, 4, 4, generator=g), torch.rand(2, channels, 4, 4, generator=g)
    for box in (CropBox(0, 4, 0, 4), CropBox(2, 6, 4, 8), CropBox(4, 8, 0, 8), CropBox(0, 8, 0, 8)):
        hr = torch.randn(2, 3, *box.size, generator=g)
        f = fuse(lr, hr, a, 2, box, order)
        lr_box = torch.zeros(1, 1, 4, 4); lr_box[..., box.y0 // 2:box.y1 // 2, box.x0 // 2:box.x1 // 2] = 1
        if order == 'reference':   # weight on the LR grid, then upsample (hrda_head.py)
            context, weight = up((1 - a * lr_box) * lr, (8, 8)), up(a * lr_box, (8, 8))
        else:
            context, weight = up(lr, (8, 8)), up(a, (8, 8))
        for i in range(8):
            for j in range(8):
                inside = box.y0 <= i < box.y1 and box.x0 <= j < box.x1
                detail = hr[..., i - box.y0, j - box.x0] if inside else torch.zeros(2, 3)
                if order == 'reference':
                    expected = context[..., i, j] + weight[..., i, j] * detail
                else:
                    w = weight[..., i, j] if inside else torch.zeros(2, channels)
                    expected = (1 - w) * context[..., i, j] + w * detail
                assert torch.allclose(f.logits[..., i, j], expected, atol=1e-6), (box, i, j)
    full = torch.randn(2, 3, 8, 8, generator=g)
    assert torch.allclose(fuse(lr, full, a, 2, None, order).logits, up((1 - a) * lr, (8, 8)) + up(a, (8, 8)) * full
                          if order == 'reference' else (1 - up(a, (8, 8))) * up(lr, (8, 8)) + up(a, (8, 8)) * full, atol=1e-6)
    with pytest.raises(ValueError, match='detail'): fuse(lr, full, a, 2, CropBox(0, 4, 0, 4), order)
    if order == 'reference':   # the mask lives on the LR grid: the box must fall on its lines
        with pytest.raises(ValueError, match='grid'): fuse(lr, torch.randn(2, 3, 3, 4), a, 2, CropBox(1, 4, 0, 4), order)

def test_attention_restricted_to_the_box(seg):
    "Outside the detail crop the prediction is the context's: exactly (upsampled order) or beyond a one-cell ring."
    torch.manual_seed(2)
    x = torch.randn(1, 3, 64, 64)
    for order in ('reference', 'upsampled'):
        hrda = HRDASegmentor(copy.deepcopy(seg), fusion=order).train()
        disable_stochastic_layers(hrda)                 # dropout off, so that the context can be recomputed
        out = hrda(x)                                   # a training pass: a random box
        assert out.detail is not None
        cell = out.detail.box.scaled(4)
        inside = torch.zeros(1, 1, 16, 16, dtype=torch.bool); inside[..., cell.y0:cell.y1, cell.x0:cell.x1] = True
        ring = torch.zeros_like(inside); ring[..., max(cell.y0 - 1, 0):cell.y1 + 1, max(cell.x0 - 1, 0):cell.x1 + 1] = True
        outside = ~(inside if order == 'upsampled' else ring)
        att = out.attention.detach()
        assert (att[outside.expand_as(att)] == 0).all() and (att[inside.expand_as(att)] > 0).all()
        if outside.any():   # there the fused logits are the (upsampled) context logits
            with torch.no_grad():
                context = hrda.model.decode(hrda.encode(x)).logits
            assert torch.allclose(out.logits.detach()[outside.expand_as(out.logits)],
                                  up(context, (16, 16))[outside.expand_as(out.logits)], atol=1e-5)

# ------------------------------------------------------------------------------------------ the wrapper
@pytest.mark.parametrize('order', ['reference', 'upsampled'])
def test_wrapper_against_direct_computation(seg, order):
    torch.manual_seed(3)
    hrda = HRDASegmentor(copy.deepcopy(seg), fusion=order).eval()
    model, x = hrda.model, torch.randn(2, 3, 64, 64)
    for box in (CropBox(0, 32, 0, 32), CropBox(16, 48, 32, 64), CropBox(32, 64, 8, 40)):
        with torch.no_grad():
            out = hrda(x, box=box)
            lr, hr = model(up(x, (32, 32))), model(box.crop(x))
            a = torch.sigmoid(hrda.attention_head(lr.features).logits)
        assert isinstance(out, HRDAOutput) and out.detail.box == box
        assert out.logits.shape == (2, 19, 16, 16) and out.cdf.shape == (2, 1, 16, 16) and out.attention.shape == (2, 19, 16, 16)
        assert torch.equal(out.detail.logits, hr.logits) and torch.equal(out.detail.cdf, hr.cdf)
        assert all(torch.equal(f, g) for f, g in zip(out.features, lr.features))
        cell = box.scaled(4)
        assert torch.allclose(out.logits, fuse(lr.logits, hr.logits, a, 2, cell, order).logits, atol=1e-6)
        assert torch.allclose(out.cdf, fuse(lr.cdf, hr.cdf, a.mean(1, keepdim=True), 2, cell, order).logits, atol=1e-6)
    # a single attention channel; DeepLabV2 (C): output stride 8, so boxes on multiples of 16
    single = HRDASegmentor(copy.deepcopy(seg), attention_classwise=False).eval()
    assert single.attention_head.classifier.out_channels == 1 and single(x, box=CropBox(0, 32, 0, 32)).attention.shape == (2, 1, 16, 16)
    c = HRDASegmentor(build_model('C', 19, 'resnet18')).eval()
    assert c.divisible == 16
    with torch.no_grad():
        out = c(x, box=CropBox(16, 48, 0, 32))
    assert out.logits.shape == (2, 19, 8, 8) and out.detail.logits.shape == (2, 19, 4, 4)

def test_modes_and_sliding(seg):
    torch.manual_seed(4)
    hrda, x = HRDASegmentor(copy.deepcopy(seg)), torch.randn(2, 3, 64, 64)
    out = hrda.train()(x)
    assert out.detail is not None and out.detail.box.size == (32, 32) and out.logits.requires_grad
    with torch.no_grad():
        assert hrda(x).detail is None                                    # the teacher: train mode, no graph
        hrda.eval()
        slid = hrda(x)
        model = hrda.model
        total, count = torch.zeros(2, 19, 16, 16), torch.zeros(1, 1, 16, 16)
        for y0 in (0, 16, 32):
            for x0 in (0, 16, 32):
                total[..., y0 // 4:y0 // 4 + 8, x0 // 4:x0 // 4 + 8] += model(x[..., y0:y0 + 32, x0:x0 + 32]).logits
                count[..., y0 // 4:y0 // 4 + 8, x0 // 4:x0 // 4 + 8] += 1
        lr = model(up(x, (32, 32)))
        a = torch.sigmoid(hrda.attention_head(lr.features).logits)
        assert torch.allclose(slid.logits, fuse(lr.logits, total / count, a).logits, atol=1e-5)
        whole = hrda(x, mode='whole')
        assert torch.allclose(whole.logits, fuse(lr.logits, model(x).logits, a).logits, atol=1e-5)
        assert hrda.slide_detail(torch.randn(1, 3, 128, 64)).logits.shape == (1, 19, 32, 16)   # 3×3 windows of 64×32
        assert HRDASegmentor(copy.deepcopy(seg), inference='whole').eval()(x).detail is None
    with pytest.raises(ValueError, match='multiples of 8'): hrda(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match='mode'): hrda(x, mode='tiles')
    for bad in (dict(lr_scale=0.3), dict(lr_scale=1.0), dict(detail_ratio=0), dict(inference='crop'),
                dict(fusion='x'), dict(offsets='x'), dict(crop_divisible=0)):
        with pytest.raises(ValueError, match=next(iter(bad))): HRDASegmentor(copy.deepcopy(seg), **bad)
    with pytest.raises(ValueError, match='outputs'): scale_attention_head(seg, 0)

# ------------------------------------------------------------------------------------------ the detail loss
def context_for(student, criterion, seed=5):
    "A StepContext after the source and mixed passes of `student` on random data (no teacher needed)."
    g = torch.Generator().manual_seed(seed)
    image, labels = torch.randn(2, 3, 64, 64, generator=g), torch.randint(0, 19, (2, 64, 64), generator=g)
    labels[:, :4] = 255
    batch = UDABatch(image, labels, image.flip(-1))
    ctx = StepContext(student, None, batch, 0, StepConfig(), criterion)
    ctx.source = student(image)
    ctx.source_logits = upsample(ctx.source.logits, (64, 64))
    is_target = torch.rand(2, 64, 64, generator=g) > 0.5
    ctx.mixed = MixedBatch(image, labels, torch.where(is_target, torch.full((2, 64, 64), 0.7), torch.ones(2, 64, 64)), is_target)
    ctx.mixed_image, ctx.mixed_out = image, student(image)
    ctx.mixed_logits = upsample(ctx.mixed_out.logits, (64, 64))
    return ctx

def test_detail_loss_terms(seg):
    torch.manual_seed(6)
    ctx = context_for(HRDASegmentor(copy.deepcopy(seg)).train(), PlainCriterion())
    losses = DetailLoss(0.1).after_source(ctx) | DetailLoss(0.1).after_mixed(ctx)
    ce = lambda z, y, w=None: (F.cross_entropy(z, y, ignore_index=255, reduction='none') * (1 if w is None else w)).mean()
    src, mix = ctx.source.detail, ctx.mixed_out.detail
    b = src.box
    assert torch.allclose(losses['src_detail'], 0.1 * ce(up(src.logits, b.size), b.crop(ctx.batch.source_label)))
    assert torch.allclose(losses['src_fused_rescale'], -0.1 * ce(ctx.source_logits, ctx.batch.source_label))
    b, m = mix.box, ctx.mixed
    assert torch.allclose(losses['mix_detail'], 0.1 * ce(up(mix.logits, b.size), b.crop(m.labels), b.crop(m.weight)))
    assert torch.allclose(losses['mix_fused_rescale'], -0.1 * ce(ctx.mixed_logits, m.labels, m.weight))
    # the step's fused loss (weight 1) plus the two terms: (1 − λ_d)·L(fused) + λ_d·L(detail)
    total = ce(ctx.source_logits, ctx.batch.source_label) + losses['src_detail'] + losses['src_fused_rescale']
    assert torch.allclose(total, 0.9 * ce(ctx.source_logits, ctx.batch.source_label) + losses['src_detail'])
    assert set(DetailLoss(0.1, rescale_fused=False).after_source(ctx)) == {'src_detail'}
    assert DetailLoss(0.0).after_source(ctx) == {} and DetailLoss(0.0).after_mixed(ctx) == {}
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match='DetailLoss weight'): DetailLoss(bad)
    plain = copy.deepcopy(seg).train()
    with pytest.raises(ValueError, match='HRDASegmentor'): DetailLoss().after_source(context_for(plain, PlainCriterion()))

def test_blda_tracker_sees_only_the_fused_logits(seg):
    "A step with DetailLoss leaves BLDA's tracker exactly as the same step without it."
    def step(criterion, components):
        torch.manual_seed(7)
        student = HRDASegmentor(copy.deepcopy(seg))
        teacher = copy.deepcopy(student).requires_grad_(False)
        g = torch.Generator().manual_seed(7)
        batch = UDABatch(torch.randn(2, 3, 64, 64, generator=g), torch.randint(0, 19, (2, 64, 64), generator=g),
                         torch.randn(2, 3, 64, 64, generator=g))
        cfg = StepConfig(pseudo_threshold=0.01)
        update_teacher(teacher, student, 0, cfg)
        return uda_step(student.train(), teacher, batch, 0, cfg, criterion, components, torch.Generator().manual_seed(7))
    with_detail, without = BLDALoss(LogitTracker(19, min_pixels=1)), BLDALoss(LogitTracker(19, min_pixels=1))
    res = step(with_detail, [DetailLoss()])
    step(without, [])
    assert {'src_detail', 'src_fused_rescale', 'mix_detail', 'mix_fused_rescale'} <= set(res.losses)
    assert all(torch.isfinite(v) for v in res.losses.values()) and res.losses['mix_cdf'] > 0
    assert with_detail.tracker.estimated('target').any() and with_detail.update
    for (k, a), b in zip(with_detail.tracker.state_dict().items(), without.tracker.state_dict().values()):
        assert torch.equal(a, b), k

# ------------------------------------------------------------------------------------------ the host and its data
def test_host_recipe_and_data(toy):
    assert HOSTS['hrda'] is HRDA and isinstance(HRDA.parts[-1], HRDAPart)
    assert (HRDA.data_scale, HRDA.eval_mode, HRDA.step.alpha, HRDA.fd_weight, HRDA.rare_class_sampling) == (2.0, 'slide', 0.999, 0.005, True)
    options = HRDA.options()
    assert (options['lr_scale'], options['detail_ratio'], options['crop_divisible'], options['detail_weight']) == (0.5, 0.5, 8, 0.1)
    assert (HRDA.pseudo_margins, HRDA.rcs_min_crop_ratio, HRDA.step.pseudo_crop_rows) == ((30, 240, 30, 30), 2.0, None)
    for bad in (dict(detail_weight=1.0), dict(data_scale=0.0), dict(rcs_min_crop_ratio=-1.0)):
        with pytest.raises(ValueError, match='HRDAPart'): HRDA.with_options(**bad)
    # v2 margins: HRDA's on real data, the toy's on the toy, an explicit value wins
    host, margins = resolve_host(TrainConfig(host='hrda', data='gta2cs'))
    assert host.data_scale == 2.0 and margins == (30, 240, 30, 30) and host.step.pseudo_crop_rows is None
    assert resolve_host(TrainConfig(host='hrda', data='gta2cs', pseudo_margins=(1, 2, 3, 4)))[1] == (1, 2, 3, 4)
    assert resolve_host(TrainConfig(host='daformer', data='gta2cs'))[1] is None
    toy_cfg = TrainConfig(host='hrda', data='toy', source_root=str(toy/'source'), target_root=str(toy/'target'), rcs_min_pixels=10)
    host, margins = resolve_host(toy_cfg)
    assert margins == benchmark_margins(BENCHMARKS['toy'], toy/'target')
    # the toy at ×2: images upsampled (native 64×32 → 128×64), crops 2 × 128, RCS ratio 2.0, test labels native
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        data = build_datasets(toy_cfg, host, margins)
        plain = build_datasets(dataclasses.replace(toy_cfg, host='daformer'), resolve_host(dataclasses.replace(toy_cfg, host='daformer'))[0], None)
    assert data.train.source.transform.scale == data.train.target.transform.scale == (128, 64)
    assert data.train.source.transform.crop_size == (256, 256) and data.train.rcs.config.min_crop_ratio == 2.0
    val = data.val[0]
    assert val['img'].shape[-2:] == (64, 128) and val['gt'].shape == (32, 64)
    assert plain.train.source.transform.scale is None and plain.val.transform.scale is None
    assert plain.train.rcs.config.min_crop_ratio == 0.5
    student = HRDA.wrap_model(build_model('T', 19, 'mit_b0', embed_dim=16))
    fd, detail = HRDA.build_components(student)
    assert isinstance(fd.reference, HRDASegmentor) and isinstance(detail, DetailLoss) and detail.weight == 0.1

# ------------------------------------------------------------------------------------------ training and evaluation
ITERATIONS = {False: 36, True: 36}   # "a few dozen" (issue 4)

def config(toy: Path, out: Path, **kw) -> TrainConfig:
    base = dict(host='hrda', encoder='mit_b0', embed_dim=16, data='toy', source_root=str(toy/'source'),
                target_root=str(toy/'target'), crop_size=(64, 64), iterations=12, warmup_iters=3, lr=1e-3,
                log_interval=1, eval_interval=12, checkpoint_interval=0, min_pixels=10, rcs_min_pixels=10,
                pseudo_threshold=0.1, output_dir=str(out), progress=False)
    return TrainConfig(**(base | kw))

@pytest.fixture(scope='module')
def runs(toy, tmp_path_factory):
    "HRDA and HRDA + BLDA trained once on the toy (the training and evaluation tests share them)."
    return {blda: train_quietly(config(toy, tmp_path_factory.mktemp(f'hrda-{blda}'), blda=blda, iterations=n, eval_interval=n))
            for blda, n in ITERATIONS.items()}

@pytest.mark.parametrize('blda', [False, True], ids=['plain', 'blda'])
def test_hrda_trains_with_finite_losses(runs, blda):
    res = runs[blda]
    train_log = checked_train_log(res, ITERATIONS[blda], {'src_ce', 'mix_ce', 'fd', 'src_detail', 'src_fused_rescale',
                                                          'mix_detail', 'mix_fused_rescale', 'pseudo_weight'})
    for r in train_log:
        assert r['src_detail'] > 0 and r['src_fused_rescale'] < 0
    assert any(r['pseudo_weight'] > 0 for r in train_log)
    assert train_log[-1]['src_ce'] < train_log[0]['src_ce']              # it learns something
    assert isinstance(res.state.student, HRDASegmentor) and isinstance(res.state.teacher, HRDASegmentor)
    assert [type(c).__name__ for c in res.state.components] == ['FeatureDistance', 'DetailLoss']
    assert res.final_eval is not None and 0 <= res.final_eval['mIoU'] <= 100
    if blda:
        assert any(r['src_cdf'] > 0 for r in train_log) and res.state.criterion.tracker.estimated('target').any()

def test_blda_evaluate_on_an_hrda_run(runs, capsys):
    "`blda evaluate` rebuilds the wrapped student from the run, slides (the host's mode), and reproduces the run's last evaluation."
    res = runs[True]
    assert main(['evaluate', str(res.output_dir), '--quiet', '--device', 'cpu', '--posthoc-tau', '0.2']) == 0
    metrics = json.loads((res.output_dir/'metrics.json').read_text())
    assert metrics['mode'] == 'slide' and metrics['images'] == 2 and 'posthoc' in metrics
    assert metrics['mIoU'] == pytest.approx(res.final_eval['mIoU'])
    assert 'slide' in capsys.readouterr().out

def test_hrda_resume_is_bit_exact(toy, tmp_path):
    "The detail crops are drawn from the global generator, which the checkpoint holds: a resumed run equals one run."
    once, twice = train_once_and_resumed(config(toy, tmp_path/'once', iterations=3, eval_interval=0))
    assert_same_state(once, twice)
    assert [r['src_detail'] for r in once.log] == [r['src_detail'] for r in twice.log]

# ------------------------------------------------------------------------------------------ MIC on HRDA
def test_mic_hrda_trains_with_finite_losses(toy, tmp_path):
    "The poster's MIC row: HRDA's student and detail terms, MIC's masked pass (with its own detail terms), + BLDA."
    from blda.hrda import MIC_HRDA
    assert HOSTS['mic_hrda'] is MIC_HRDA and MIC_HRDA.data_scale == 2.0 and MIC_HRDA.options()['mask_ratio'] == 0.7
    res = train_quietly(config(toy, tmp_path, host='mic_hrda', blda=True, iterations=8, eval_interval=8))
    log = [r for r in res.log if r['kind'] == 'train']
    assert len(log) == 8 and all(math.isfinite(v) for r in log for v in r.values() if isinstance(v, float))
    assert all({'mic', 'mix_detail', 'src_detail'} <= set(r) for r in log)
    assert [type(c).__name__ for c in res.state.components] == ['FeatureDistance', 'DetailLoss', 'MaskedConsistency']
    assert isinstance(res.state.student, HRDASegmentor) and res.final_eval is not None
