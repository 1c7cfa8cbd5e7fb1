"""`blda.cdac`: cross-domain attention, the joint four-stream pass, the attention consistency, the component
and the CDAC host (CPU, MiT-B0, random tensors and the tiny toy benchmark with 32×32 crops)."""
import copy, dataclasses
from pathlib import Path

import pytest

from conftest import assert_same_state, checked_train_log, train_once_and_resumed, train_quietly
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.encoders.mix_transformer import Attention as MiTAttention

from blda.cdac import (CDAC, QUERY_KEY, STREAMS, AttentionMap, CDACPart, CrossDomainAttention,
                       CrossDomainConsistency, CrossDomainSegmentor, StreamPlan, attention_consistency, token_domain)
from blda.losses import BLDALoss
from blda.models import build_model
from blda.selftrain import disable_stochastic_layers
from blda.tracker import LogitTracker
from blda.train import HOSTS, TrainConfig, build_student, resolve_host
from blda.uda import (DAFORMER, Component, PlainCriterion, StepConfig, StepContext, UDABatch, uda_step, update_teacher,
                      upsample)

ITERATIONS = 36   # "a few dozen" (issue 4)

def small_model(seed=0, cdf_head=False):
    torch.manual_seed(seed)
    return build_model('T', 19, 'mit_b0', embed_dim=16, cdf_head=cdf_head)

def make_batch(seed=0, size=(32, 64)):
    "Random images; MiT-B0's key grids are 1×2 at every layer on 32×64 (all 1×1 on 32×32: trivial attention)."
    g = torch.Generator().manual_seed(seed)
    return UDABatch(torch.randn(2, 3, *size, generator=g), torch.randint(0, 19, (2, *size), generator=g),
                    torch.randn(2, 3, *size, generator=g))

def grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]

# the step of the random-tensor tests: DAFormer's PL crop would blank a 32-row image, and an untrained teacher
# is never 96.8 % sure
STEP = dataclasses.replace(DAFORMER.step, pseudo_threshold=0.01, pseudo_crop_rows=None)

# ------------------------------------------------------------------------------------------ the attention layer
def direct_attention(a: MiTAttention, queries_from, keys_from, height, width, detach_queries=False):
    "MiT attention of the `queries_from` tokens over the `keys_from` tokens, written out from the definition."
    heads, d = a.num_heads, a.dim // a.num_heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2)
    if a.sr_ratio > 1:
        grid = keys_from.transpose(1, 2).reshape(keys_from.shape[0], -1, height, width)
        reduced = F.conv2d(grid, a.sr.weight, a.sr.bias, stride=a.sr_ratio).flatten(2).transpose(1, 2)
        keys_from = F.layer_norm(reduced, (a.dim,), a.norm.weight, a.norm.bias, a.norm.eps)
    k, v = F.linear(keys_from, a.kv.weight, a.kv.bias).split(a.dim, dim=-1)
    q = split(F.linear(queries_from, a.q.weight, a.q.bias))
    if detach_queries: q = q.detach()
    probs = (q @ split(k).transpose(-2, -1) / d ** 0.5).softmax(-1)
    out = (probs @ split(v)).transpose(1, 2).reshape(queries_from.shape[0], -1, a.dim)
    return F.linear(out, a.proj.weight, a.proj.bias), probs

@pytest.mark.parametrize('sr_ratio', [1, 2])
def test_cross_attention_equals_direct_computation(sr_ratio):
    torch.manual_seed(sr_ratio)
    layer = MiTAttention(dim=12, num_heads=3, qkv_bias=True, sr_ratio=sr_ratio)
    cross = CrossDomainAttention(copy.deepcopy(layer))
    B, H, W = 2, 4, 6                                                    # a non-square grid
    tokens = {s: torch.randn(B, H * W, 12, requires_grad=True) for s in STREAMS}
    assert torch.equal(cross(tokens['mixed'], H, W), layer(tokens['mixed'], H, W))     # no plan: smp's layer
    for detach in (True, False):
        plan = StreamPlan(STREAMS, detach, ('mixed', 't2s'), {'mixed': [], 't2s': []})
        cross.plan = plan
        out = dict(zip(STREAMS, cross(torch.cat([tokens[s] for s in STREAMS]), H, W).chunk(4)))
        cross.plan = None
        for s in STREAMS:
            q_from, kv_from = QUERY_KEY[s]
            expected, probs = direct_attention(layer, tokens[q_from], tokens[kv_from], H, W)
            assert torch.allclose(out[s], expected, atol=1e-6), s
            if s in plan.record:
                (m,) = plan.maps[s]
                assert torch.allclose(m.probs, probs, atol=1e-6) and m.query_grid == (H, W)
                assert m.key_grid == (H // sr_ratio, W // sr_ratio)
        # the cross streams' own tokens never enter the attention
        zero = lambda g: g is None or not g.any()
        assert all(map(zero, torch.autograd.grad(out['t2s'].sum() + out['s2t'].sum(), [tokens['t2s'], tokens['s2t']],
                                                 allow_unused=True, retain_graph=True)))
        # detached queries: t2s reaches the mixed tokens only through its (detached) queries
        (g,) = torch.autograd.grad(out['t2s'].sum(), [tokens['mixed']], allow_unused=True)
        assert zero(g) == detach
    with pytest.raises(ValueError, match='MiT Attention'): CrossDomainAttention(torch.nn.Linear(2, 2))

def naive_streams(model, source, mixed):
    "The four streams through the encoder one at a time, in lock step, attention written out (eval mode)."
    enc = model.encoder
    x = {'source': source, 'mixed': mixed, 't2s': source, 's2t': mixed}
    stages = {s: [] for s in x}
    for i in (1, 2, 3, 4):
        x = {s: getattr(enc, f'patch_embed{i}')(t) for s, t in x.items()}
        for block in getattr(enc, f'block{i}'):
            B, C, H, W = x['source'].shape
            tok = {s: t.flatten(2).transpose(1, 2) for s, t in x.items()}
            normed = {s: block.norm1(t) for s, t in tok.items()}
            tok = {s: tok[s] + direct_attention(block.attn, normed[QUERY_KEY[s][0]], normed[QUERY_KEY[s][1]], H, W)[0]
                   for s in tok}
            tok = {s: t + block.mlp(block.norm2(t), H, W) for s, t in tok.items()}
            x = {s: t.transpose(1, 2).reshape(B, C, H, W) for s, t in tok.items()}
        x = {s: getattr(enc, f'norm{i}')(t) for s, t in x.items()}
        for s in x: stages[s].append(x[s])
    return stages

def test_joint_pass_equals_a_direct_per_stream_computation():
    plain = small_model().eval()
    model = CrossDomainSegmentor(copy.deepcopy(plain)).eval()
    g = torch.Generator().manual_seed(1)
    source, mixed = torch.randn(2, 3, 64, 96, generator=g), torch.randn(2, 3, 64, 96, generator=g)
    out = model(source, mixed=mixed, decode=STREAMS, record=STREAMS)
    expected = naive_streams(plain, source, mixed)
    for s in STREAMS:
        for a, b in zip(out.features[s], expected[s]): assert torch.allclose(a, b, atol=1e-4), s
        assert torch.allclose(out.outputs[s].logits, model.decode(expected[s]).logits, atol=1e-4)
    assert [m.query_grid for m in out.attention['mixed']][::2] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert [m.key_grid for m in out.attention['mixed']][::2] == [(2, 3), (2, 3), (2, 3), (2, 3)]
    # the self-attention streams of the joint pass are the plain passes; the teacher's maps are the plain maps
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out.features['mixed'], plain.encode(mixed)))
    maps = model.attention_maps(mixed)
    assert all(torch.allclose(a.probs, b.probs, atol=1e-5) for a, b in zip(maps, out.attention['mixed']))
    assert all(m.plan is None for m in model.attention_layers())

def test_plain_forward_is_the_segmentor_and_bad_input_is_refused():
    plain = small_model()
    model = CrossDomainSegmentor(copy.deepcopy(plain))
    assert list(model.state_dict()) == list(plain.state_dict())          # checkpoints load either way
    assert len(model.attention_layers()) == 8
    x = torch.randn(2, 3, 32, 32)
    for mode in (True, False):
        plain.train(mode); model.train(mode)
        torch.manual_seed(5); a = plain(x)
        torch.manual_seed(5); b = model(x)
        assert torch.equal(a.logits, b.logits) and all(torch.equal(p, q) for p, q in zip(a.features, b.features))
    with pytest.raises(ValueError, match='already'): CrossDomainSegmentor(model)
    with pytest.raises(ValueError, match='MiT encoder'): CrossDomainSegmentor(build_model('C', 19, 'resnet18'))
    with pytest.raises(ValueError, match='need the mixed image'): model(x, streams=STREAMS)
    with pytest.raises(ValueError, match="'t2s' needs"): model(x, mixed=x, streams=('source', 't2s'))
    with pytest.raises(ValueError, match='non-empty subset'): model(x, mixed=x, streams=('src',))
    with pytest.raises(ValueError, match='decode must be'): model(x, mixed=x, streams=('mixed',), decode=('t2s',))
    with pytest.raises(ValueError, match='one shape'): model(x, mixed=torch.randn(2, 3, 32, 64))

# ------------------------------------------------------------------------------------------ attention consistency
def test_attention_consistency_against_a_loop():
    g = torch.Generator().manual_seed(0)
    grid, keys, B, heads = (3, 4), (1, 2), 2, 2
    maps = [AttentionMap(torch.rand(B, heads, 12, 2, generator=g).softmax(-1), grid, keys) for _ in range(3)]
    is_source = torch.rand(B, 6, 8, generator=g) > 0.5
    for same_domain_only in (True, False):
        got = attention_consistency([maps[0]], [maps[1]], [maps[2]], is_source, same_domain_only)
        mq = F.interpolate(is_source[:, None].float(), size=grid, mode='nearest').flatten(1)
        mk = F.interpolate(is_source[:, None].float(), size=keys, mode='nearest').flatten(1)
        total = 0.0
        for b in range(B):
            for h in range(heads):
                for i in range(12):
                    for j in range(2):
                        r = (maps[1] if mq[b, i] else maps[2]).probs[b, h, i, j]
                        w = 1.0 if (mq[b, i] == mk[b, j] or not same_domain_only) else 0.0
                        total += w * r * (r.log() - maps[0].probs[b, h, i, j].log())
        assert torch.allclose(got, total / (B * heads * 12 * 2), atol=1e-7)
    # two layers: the mean of the layers' losses; an underflowed probability gives no NaN
    two = attention_consistency(maps[:2], maps[1:], maps[1:], is_source)
    assert torch.allclose(two, (attention_consistency([maps[0]], [maps[1]], [maps[1]], is_source)
                                + attention_consistency([maps[1]], [maps[2]], [maps[2]], is_source)) / 2)
    zero = maps[0].probs.clone(); zero[..., 0] = 0.0
    assert torch.isfinite(attention_consistency([maps[0]._replace(probs=zero)], [maps[1]], [maps[2]], is_source, False))
    with pytest.raises(ValueError, match='one map per layer'): attention_consistency(maps[:1], maps[:2], maps[:1], is_source)
    with pytest.raises(ValueError, match='differ in shape'):
        attention_consistency([maps[0]], [AttentionMap(torch.rand(B, heads, 12, 4), grid, (2, 2))], [maps[2]], is_source)
    assert token_domain(torch.ones(1, 8, 8, dtype=torch.bool), (2, 4)).shape == (1, 8)

# ------------------------------------------------------------------------------------------ the component
class Spy(Component):
    "Keeps the step context for a check after the step."
    def extra_losses(self, ctx):
        self.ctx = ctx
        return {}

def test_split_step_gives_the_reference_joint_gradient():
    """With Dropout/DropPath off, the step's halved source and mixed passes plus the component's joint pass
    give the gradient of the reference's single loss 0.5·(src + t2s + tgt + s2t) + λ·KL on one joint graph."""
    student = CrossDomainSegmentor(small_model())
    reference = copy.deepcopy(student)
    teacher = copy.deepcopy(student).requires_grad_(False)
    for m in (student, reference): m.train(); disable_stochastic_layers(m)
    batch, step = make_batch(), dataclasses.replace(STEP, source_weight=0.5, mixed_weight=0.5)
    update_teacher(teacher, student, 0, step)
    spy = Spy()
    result = uda_step(student, teacher, batch, 0, step, PlainCriterion(), [spy, CrossDomainConsistency()],
                      torch.Generator().manual_seed(0))
    ctx = spy.ctx
    assert result.pseudo_weight > 0 and result.losses['attn_kl'] != 0 and result.losses['t2s_ce'] > 0

    out = reference(batch.source_image, mixed=ctx.mixed_image, decode=STREAMS, record=('mixed',))
    crit, mix, size = PlainCriterion(), ctx.mixed, ctx.mixed.labels.shape[-2:]
    logits = {s: upsample(out.outputs[s].logits, size) for s in STREAMS}
    src_label, from_source = batch.source_label, torch.zeros_like(mix.is_target)
    loss = 0.5 * (crit.source(logits['source'], src_label).total
                  + crit.mixed(logits['t2s'], src_label, from_source, mix.weight).total
                  + crit.mixed(logits['mixed'], mix.labels, mix.is_target, mix.weight).total
                  + crit.mixed(logits['s2t'], mix.labels, mix.is_target, None).total)
    with torch.no_grad():
        src_maps, tgt_maps = teacher.attention_maps(batch.source_image), teacher.attention_maps(batch.target_image)
    kl = attention_consistency(out.attention['mixed'], src_maps, tgt_maps, ~mix.is_target)
    (loss + kl).backward()
    assert torch.allclose(kl, result.losses['attn_kl'], rtol=1e-4)
    assert torch.allclose(loss, sum(result.losses[k] for k in ('src_ce', 't2s_ce', 'mix_ce', 's2t_ce')), rtol=1e-4)
    for (name, p), a, b in zip(student.named_parameters(), grads(student), grads(reference)):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6), name

class Recording(PlainCriterion):
    "The plain loss, recording every call and whether it came with tracker updates."
    def __init__(self):
        super().__init__()
        self.update, self.calls = True, []
    def source(self, logits, labels, cdf_pred=None):
        self.calls.append(('source', self.update, labels, None, None))
        return super().source(logits, labels, cdf_pred)
    def mixed(self, logits, labels, is_target, weight=None, cdf_pred=None):
        self.calls.append(('mixed', self.update, labels, is_target, weight))
        return super().mixed(logits, labels, is_target, weight, cdf_pred)

def test_branches_labels_weights_and_tracker_updates():
    student = CrossDomainSegmentor(small_model())
    teacher = copy.deepcopy(student).requires_grad_(False)
    batch = make_batch()
    update_teacher(teacher, student, 0, STEP)
    crit, spy = Recording(), Spy()
    uda_step(student, teacher, batch, 0, STEP, crit, [spy, CrossDomainConsistency()], torch.Generator().manual_seed(0))
    mix = spy.ctx.mixed
    (src, src_upd, src_lab, _, _), (tgt, tgt_upd, tgt_lab, tgt_dom, tgt_w) = crit.calls[:2]
    assert (src, src_upd, tgt, tgt_upd) == ('source', True, 'mixed', True)       # the step's passes feed the tracker
    (_, t2s_upd, t2s_lab, t2s_dom, t2s_w), (_, s2t_upd, s2t_lab, s2t_dom, s2t_w) = crit.calls[2:]
    assert not t2s_upd and not s2t_upd                                            # the cross passes do not
    assert torch.equal(t2s_lab, batch.source_label) and not t2s_dom.any() and torch.equal(t2s_w, mix.weight)
    assert torch.equal(s2t_lab, mix.labels) and torch.equal(s2t_dom, mix.is_target) and s2t_w is None
    assert crit.update                                                            # the step's criterion untouched
    # with BLDA: the tracker ends the step as a step without the component leaves it
    trackers = []
    for comps in ([CrossDomainConsistency()], []):
        crit = BLDALoss(LogitTracker(19, min_pixels=1))
        student = CrossDomainSegmentor(small_model(cdf_head=True))
        teacher = copy.deepcopy(student).requires_grad_(False)
        update_teacher(teacher, student, 0, STEP)
        uda_step(student, teacher, batch, 0, STEP, crit, comps, torch.Generator().manual_seed(0))
        trackers.append(crit.tracker.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(trackers[0].values(), trackers[1].values()))

def test_switches_and_weights():
    batch = make_batch()
    def run(component, step=STEP, seed=0):
        student = CrossDomainSegmentor(small_model(seed))
        disable_stochastic_layers(student)                      # the joint pass's DropPath draws depend on its streams
        teacher = copy.deepcopy(student).requires_grad_(False)
        update_teacher(teacher, student, 0, step)
        return uda_step(student, teacher, batch, 0, step, PlainCriterion(), [component], torch.Generator().manual_seed(0))
    full = run(CrossDomainConsistency())
    assert full.losses['attn_kl'] != 0
    attention_only = run(CrossDomainConsistency(cross_streams=False, attention_weight=0.5)).losses
    assert torch.allclose(attention_only['attn_kl'], 0.5 * full.losses['attn_kl']) and 't2s_ce' not in attention_only
    weighted = run(CrossDomainConsistency(t2s_weight=0.25, s2t_weight=0.125, attention_weight=0),
                   dataclasses.replace(STEP, source_weight=0.5, mixed_weight=0.25))
    assert 'attn_kl' not in weighted.losses
    assert torch.allclose(weighted.losses['t2s_ce'], 0.5 * full.losses['t2s_ce'])
    assert torch.allclose(weighted.losses['s2t_ce'], 0.25 * full.losses['s2t_ce'])
    assert torch.equal(weighted.losses['src_ce'], 0.5 * full.losses['src_ce'])
    assert torch.equal(weighted.losses['mix_ce'], 0.25 * full.losses['mix_ce'])
    for bad in (dict(t2s_weight=-1.0), dict(attention_weight=-0.1)):
        with pytest.raises(ValueError, match='CrossDomainConsistency'): CrossDomainConsistency(**bad)
        with pytest.raises(ValueError, match='CDACPart'): CDAC.with_options(**bad)
    for bad in ('source_weight', 'mixed_weight'):
        with pytest.raises(ValueError, match=f'StepConfig.{bad}'): StepConfig(**{bad: -1.0})
    unwrapped = small_model()
    ctx = StepContext(unwrapped, unwrapped, batch, 0, STEP, PlainCriterion(), mixed=object())
    with pytest.raises(ValueError, match='CrossDomainSegmentor'): CrossDomainConsistency().extra_losses(ctx)

def test_streams_off_reproduces_the_daformer_host_exactly():
    """CDAC with its streams and attention loss off and the step weights at 1 is DAFormer: the same losses,
    gradients and tracker, bit for bit, although its student is the wrapped segmentor."""
    host = dataclasses.replace(CDAC.with_options(cross_streams=False, attention_weight=0.0), step=DAFORMER.step)
    batch = make_batch(seed=3)
    batch.source_label[0] = 13                                                 # a thing cell for the feature distance
    runs = []
    for h in (DAFORMER, host):
        torch.manual_seed(0)
        student = h.wrap_model(build_model('T', 19, 'mit_b0', embed_dim=16, cdf_head=True))
        comps = h.build_components(student)
        teacher = copy.deepcopy(student).requires_grad_(False)
        with torch.no_grad():                                                   # move off the FD reference
            for p in student.parameters(): p.add_(0.01 * torch.randn_like(p))
        crit = BLDALoss(LogitTracker(19, min_pixels=1))
        update_teacher(teacher, student, 0, h.step)
        step = dataclasses.replace(h.step, pseudo_threshold=0.01, pseudo_crop_rows=(2, 4))
        torch.manual_seed(7)                                                    # DropPath / Dropout draws
        out = uda_step(student, teacher, batch, 0, step, crit, comps, torch.Generator().manual_seed(0))
        runs.append((out, grads(student), crit.tracker.state_dict(), type(student).__name__, [type(c).__name__ for c in comps]))
    (a, ga, ta, na, ca), (b, gb, tb, nb, cb) = runs
    assert (na, nb) == ('Segmentor', 'CrossDomainSegmentor') and ca == cb == ['FeatureDistance']
    assert a.losses.keys() == b.losses.keys() and all(torch.equal(a.losses[k], b.losses[k]) for k in a.losses)
    assert a.losses['fd'] > 0 and a.pseudo_weight > 0
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert all(torch.equal(x, y) for x, y in zip(ta.values(), tb.values()))

# ------------------------------------------------------------------------------------------ the host and training
def test_host_is_daformer_plus_cdac_and_registered(toy):
    assert HOSTS['cdac'] is CDAC and CDAC.parts == DAFORMER.parts + (CDACPart(),)
    assert dataclasses.replace(CDAC.step, source_weight=1.0, mixed_weight=1.0) == DAFORMER.step
    o = CDAC.options()
    assert (CDAC.step.source_weight, CDAC.step.mixed_weight, o['t2s_weight'], o['s2t_weight']) == (0.5,) * 4
    assert (o['attention_weight'], o['detach_queries'], o['attention_same_domain'], o['cross_streams']) == (1.0, True, True, True)
    assert (CDAC.fd_weight, CDAC.rare_class_sampling, CDAC.step.alpha, CDAC.step.pseudo_crop_rows) == (0.005, True, 0.999, (15, 120))
    cfg = TrainConfig(host='cdac', encoder='mit_b0', fd_weight=0.0, alpha=0.9, data='toy',
                      source_root=str(toy/'source'), target_root=str(toy/'target'))
    host, _ = resolve_host(cfg)
    assert CDACPart() in host.parts and host.fd_weight == 0 and host.step.alpha == 0.9 and host.step.source_weight == 0.5
    assert [type(c).__name__ for c in host.build_components(build_student(cfg, host))] == ['CrossDomainConsistency']
    with pytest.raises(ValueError, match='MiT encoder'):
        build_student(dataclasses.replace(cfg, arch='C', encoder='resnet18'), host)

def config(toy: Path, out: Path, **kw) -> TrainConfig:
    base = dict(host='cdac', encoder='mit_b0', embed_dim=32, data='toy', source_root=str(toy/'source'),
                target_root=str(toy/'target'), crop_size=(32, 64), iterations=ITERATIONS, warmup_iters=3, lr=1e-3,
                log_interval=1, eval_interval=ITERATIONS, eval_max_images=4, checkpoint_interval=0, min_pixels=10,
                rcs_min_pixels=10, pseudo_threshold=0.3, output_dir=str(out), progress=False)
    return TrainConfig(**(base | kw))

@pytest.mark.parametrize('blda', [False, True], ids=['plain', 'blda'])
def test_cdac_trains_with_finite_losses(toy, tmp_path, blda):
    res = train_quietly(config(toy, tmp_path, blda=blda))
    train_log = checked_train_log(res, ITERATIONS, {'src_ce', 'mix_ce', 'fd', 't2s_ce', 's2t_ce', 't2s_cdf', 's2t_cdf',
                                                    'attn_kl', 'pseudo_weight'})
    assert any(r['attn_kl'] != 0 for r in train_log) and any(r['pseudo_weight'] > 0 for r in train_log)
    assert any(r['t2s_cdf'] > 0 for r in train_log) == blda
    assert isinstance(res.state.student, CrossDomainSegmentor)
    assert [type(c).__name__ for c in res.state.components] == ['FeatureDistance', 'CrossDomainConsistency']
    assert res.final_eval is not None and 0 <= res.final_eval['mIoU'] <= 100
    if blda: assert res.state.criterion.tracker.estimated('target').any()

def test_cdac_resume_is_bit_exact(toy, tmp_path):
    "The joint pass draws only from the global generator (DropPath, Dropout), which checkpoints hold."
    once, twice = train_once_and_resumed(config(toy, tmp_path/'once', iterations=4, eval_interval=0))
    assert_same_state(once, twice)
    assert [r['attn_kl'] for r in once.log] == [r['attn_kl'] for r in twice.log]
