"""`blda.train` and `blda.evaluate` on the tiny toy benchmark (CPU, MiT-B0 / ResNet-18, 32×32 crops).

Each host run is 36 iterations ("a few dozen", as issue 4 asks): every branch of the step (EMA, pseudo-
labels, ClassMix, augmentation, FD, RCS, tracker updates on both domains) runs many times, and the file
stays near a minute on two shared cores."""
import dataclasses, math, warnings
from pathlib import Path

import pytest
import torch

from conftest import checked_train_log, train_quietly
from blda.data import cityscapes_dataset
from blda.evaluate import evaluate, model_logits, predict_slide, predict_whole
from blda.models import build_model
from blda.tracker import LogitTracker
from blda.train import (TIMING_KEYS, TrainConfig, lr_factor, read_log, resolve_host, train)

ITERATIONS = 36

def config(toy: Path, out: Path, **kw) -> TrainConfig:
    base = dict(encoder='mit_b0', data='toy', source_root=str(toy/'source'), target_root=str(toy/'target'),
                crop_size=(32, 32), iterations=ITERATIONS, warmup_iters=3, lr=1e-3, log_interval=1,
                eval_interval=ITERATIONS, checkpoint_interval=0, min_pixels=10, rcs_min_pixels=10,
                pseudo_threshold=0.3, output_dir=str(out), progress=False)
    return TrainConfig(**(base | kw))

def untimed(log):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in log]

# ------------------------------------------------------------------------------------------ hosts ± BLDA
@pytest.mark.parametrize('blda', [False, True], ids=['plain', 'blda'])
@pytest.mark.parametrize('host', ['source_only', 'dacs', 'daformer'])
def test_hosts_train_with_finite_losses(toy, tmp_path, host, blda):
    res = train_quietly(config(toy, tmp_path, host=host, blda=blda))
    expected = {'src_ce', 'src_cdf'} | ({'mix_ce', 'mix_cdf', 'pseudo_weight'} if host != 'source_only' else set()) \
        | ({'fd'} if host == 'daformer' else set())
    train_log = checked_train_log(res, ITERATIONS, expected)
    assert any(r['src_cdf'] > 0 for r in train_log) == blda
    # the criterion's calls are timed inside the step (blda.uda.Stopwatch)
    assert all(0 < r['criterion_seconds_per_iter'] < r['seconds_per_iter'] for r in train_log)
    if host != 'source_only': assert any(r['pseudo_weight'] > 0 for r in train_log)
    ev = res.final_eval
    assert ev is not None and ev['iteration'] == ITERATIONS and 0 <= ev['mIoU'] <= 100
    assert read_log(tmp_path/'metrics.jsonl') == res.log
    assert not [p for p in tmp_path.iterdir() if p.name.endswith('.tmp')]   # nothing half-written left
    st = res.state
    if host == 'source_only': assert st.teacher is None
    else: assert any(not torch.equal(a, b) for a, b in zip(st.teacher.parameters(), st.student.parameters()))
    if blda:
        tracker = st.criterion.tracker
        assert tracker.estimated('source').any() and tracker.estimated('anchor').all()
        assert tracker.estimated('target').any() == (host != 'source_only')

def test_static_tracker_option():
    "--gmm-static / --no-gmm-static force the tracker's update; by default the tracker picks (tests/test_tracker.py)."
    from blda.train import build_criterion
    import argparse
    from blda.train_cli import add_arguments, given_fields
    parser = argparse.ArgumentParser(); add_arguments(parser)
    for argv, static in (([], None), (['--gmm-static'], True), (['--no-gmm-static'], False)):
        config = TrainConfig(**given_fields(parser.parse_args(argv + ['--blda'])))
        assert config.gmm_static is static and build_criterion(config).tracker.static is static, argv

def test_deeplab_c_daformer_blda(toy, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        res = train(config(toy, tmp_path, host='daformer', blda=True, arch='C', encoder='resnet18', iterations=6,
                           eval_interval=6))
    assert res.iteration == 6 and all(math.isfinite(v) for r in res.log if r['kind'] == 'train'
                                      for k, v in r.items() if k.endswith(('_ce', '_cdf', 'fd')))

def test_trains_without_target_train_labels(toy, tmp_path):
    "Unsupervised: a copy of the toy whose target train labels were deleted trains; only the val labels are read."
    import shutil
    copy = tmp_path/'toy'
    shutil.copytree(toy, copy)
    labels = list((copy/'target'/'gtFine'/'train').rglob('*'))
    assert any(p.name.endswith('_labelTrainIds.png') for p in labels)
    shutil.rmtree(copy/'target'/'gtFine'/'train')
    cfg = config(copy, tmp_path/'run', host='daformer', blda=True, iterations=3, eval_interval=3)
    from blda.train import build_datasets
    host, margins = resolve_host(cfg)
    pair = build_datasets(cfg, host, margins).train[0]
    assert 'gt' in pair['source'] and 'gt' not in pair['target']
    res = train_quietly(cfg)
    assert res.iteration == 3 and res.final_eval is not None

# ------------------------------------------------------------------------------------------ exact resume
def test_resume_is_bit_exact(toy, tmp_path):
    "Stopped at 3 of 6 iterations and resumed: the same weights, tracker, optimiser, RNG and metrics as one run."
    cfg = config(toy, tmp_path/'once', host='daformer', blda=True, iterations=6, eval_interval=3,
                 eval_posthoc_tau=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        once = train(cfg)
        rng_once = torch.get_rng_state()
        half = train(dataclasses.replace(cfg, output_dir=str(tmp_path/'twice'), stop_after=3))
        assert half.iteration == 3 and (tmp_path/'twice'/'checkpoint.pt').exists()
        twice = train(dataclasses.replace(cfg, output_dir=str(tmp_path/'twice')))
        rng_twice = torch.get_rng_state()
    assert twice.iteration == 6
    a, b = once.state.state_dict(), twice.state.state_dict()
    for key in ('student', 'teacher', 'criterion'):
        assert a[key].keys() == b[key].keys()
        for name in a[key]: assert torch.equal(a[key][name], b[key][name]), (key, name)
    for (i, sa), (j, sb) in zip(a['optimizer']['state'].items(), b['optimizer']['state'].items()):
        assert i == j and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a['scheduler'] == b['scheduler']
    assert torch.equal(a['generator'], b['generator']) and torch.equal(rng_once, rng_twice)
    assert untimed(once.log) == untimed(twice.log)
    assert [r['kind'] for r in once.log].count('eval') == 2 and 'posthoc' in once.final_eval
    assert twice.state.criterion.tracker.estimated('target').any()       # the target side was exercised too

def test_bad_latest_checkpoint_resumes_from_the_previous(toy, tmp_path, capsys):
    "Checkpoints open with weights_only=True; a truncated (or missing) latest one resumes from the one before, bit for bit."
    from conftest import assert_same_state
    from blda.train import previous_checkpoint
    cfg = config(toy, tmp_path/'once', host='dacs', blda=True, iterations=6, eval_interval=0, checkpoint_interval=2)
    once = train_quietly(cfg)
    run = tmp_path/'twice'
    train_quietly(dataclasses.replace(cfg, output_dir=str(run), stop_after=4))
    latest, previous = run/'checkpoint.pt', previous_checkpoint(run/'checkpoint.pt')
    assert previous.name == 'checkpoint.previous.pt'
    assert [torch.load(f, weights_only=True)['iteration'] for f in (latest, previous)] == [4, 2]
    latest.write_bytes(latest.read_bytes()[:len(latest.read_bytes()) // 3])
    capsys.readouterr()
    twice = train_quietly(dataclasses.replace(cfg, output_dir=str(run)))
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith(f"blda train: warning: {latest} is not a readable checkpoint")
    assert err.rstrip().endswith(f"resuming from {previous}")
    assert twice.iteration == 6 and untimed(twice.log) == untimed(once.log)
    assert_same_state(once, twice, ('student', 'teacher', 'criterion'))
    assert [torch.load(f, weights_only=True)['iteration'] for f in (latest, previous)] == [6, 4]
    latest.unlink()                                                      # a crash between the two renames
    again = train_quietly(dataclasses.replace(cfg, output_dir=str(run)))
    assert again.iteration == 6 and 'checkpoint.pt is missing' in capsys.readouterr().err
    assert_same_state(once, again, ('student', 'teacher', 'criterion'))

def test_resume_refuses_another_config(toy, tmp_path):
    cfg = config(toy, tmp_path, host='dacs', iterations=2, eval_interval=0)
    train(cfg)
    with pytest.raises(ValueError, match='lr'):
        train(dataclasses.replace(cfg, lr=1e-4))
    assert train(dataclasses.replace(cfg, lr=1e-4, resume=False)).iteration == 2
    # a run begun with the tracker's update forced resumes under another choice (same update, other arithmetic)
    part = dataclasses.replace(cfg, output_dir=str(tmp_path/'static'), stop_after=1)
    assert train(part).iteration == 1
    assert train(dataclasses.replace(part, stop_after=None, gmm_static=True)).iteration == 2

# ------------------------------------------------------------------------------------------ config and schedule
def test_config_errors_name_the_field(toy, tmp_path):
    for bad, name in [(dict(host='dafomer'), 'host'), (dict(arch='X'), 'arch'), (dict(batch_size=0), 'batch_size'),
                      (dict(crop_size=(32,)), 'crop_size'), (dict(precision='fp16'), 'precision'),
                      (dict(device='tpu'), 'device'), (dict(eval_posthoc_tau=0.2), 'eval_posthoc_tau'),
                      (dict(data='imagenet'), 'data'), (dict(tau=-1.0), 'tau')]:
        with pytest.raises(ValueError, match=f"TrainConfig.{name}"): TrainConfig(**bad)
    with pytest.raises(ValueError, match='source_root'): train(TrainConfig(data='toy', output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match='unknown'): TrainConfig.from_dict({'hots': 'dacs'})
    cfg = TrainConfig(crop_size=[64, 32], pseudo_margins=[0, 3, 0, 0])      # lists (CLI, papermill) become tuples
    assert cfg.crop_size == (64, 32) and TrainConfig.from_dict(cfg.to_dict()) == cfg

def test_schedule_and_host_resolution(toy, tmp_path):
    res = train(config(toy, tmp_path, host='dacs', iterations=5, warmup_iters=2, eval_interval=0))
    lrs = [r['lr'] for r in res.log if r['kind'] == 'train']
    assert lrs == pytest.approx([1e-3 * lr_factor(i, 5, 2, 1e-6, 1.0) for i in range(5)], rel=1e-9)
    heads = [g for g in res.state.optimizer.param_groups if g['lr_mult'] == 10.0]
    assert heads and all(n.startswith('head.') for g in heads for n in g['names'])
    host, margins = resolve_host(config(toy, tmp_path, host='daformer'))
    assert host.step.pseudo_crop_rows is None and margins == (0, 3, 0, 0)   # toy: v2 margins scaled to 32 rows
    host, margins = resolve_host(dataclasses.replace(config(toy, tmp_path, host='daformer'), data='gta2cs'))
    assert host.step.pseudo_crop_rows == (15, 120) and margins is None
    host, _ = resolve_host(config(toy, tmp_path, host='daformer', alpha=0.9, fd_weight=0.0, rcs=False))
    assert (host.step.alpha, host.fd_weight, host.rare_class_sampling) == (0.9, 0.0, False)

# ------------------------------------------------------------------------------------------ evaluation
def test_evaluate_metrics_posthoc_and_slide(toy):
    torch.manual_seed(0)
    model = build_model('T', 19, 'mit_b0')
    val = cityscapes_dataset(toy/'target', 'val', scale=None, crop_size=None, flip_prob=0, label_at_full_res=True)
    res = evaluate(model, val)
    assert set(res) == {'mIoU', 'mIoU_std', 'mAcc', 'mAcc_std', 'IoU', 'Acc', 'bias', 'predicted', 'images'}
    assert res['images'] == len(val) and len(res['bias']) == 19 and abs(sum(res['bias'])) < 1e-6
    assert model.training                                                 # restored after evaluation
    tracker = LogitTracker(19, min_pixels=5)
    with torch.no_grad():
        for s in (val[i] for i in range(len(val))):
            tracker.update(model(s['img'][None]).logits, torch.randint(0, 19, (1, 8, 16)), 'source')
            tracker.update(model(s['img'][None]).logits, torch.randint(0, 19, (1, 8, 16)), 'target')
    res = evaluate(model, val, tracker=tracker, posthoc_tau=1.0)
    assert set(res['posthoc']) == set(res) - {'posthoc', 'images'}
    slide = evaluate(model, val, mode='slide', crop=(32, 64), stride=(16, 32))
    assert slide['mIoU'] == evaluate(model, val)['mIoU']                 # one window covers the 64×32 image
    model.eval()
    x = torch.randn(2, 3, 64, 96)
    whole = predict_whole(model_logits(model), x)
    assert torch.equal(predict_slide(model_logits(model), x, crop=(64, 96), stride=(32, 32)), whole)
    assert torch.equal(predict_slide(model_logits(model), x, crop=(128, 128), stride=(64, 64)), whole)
    tiled = predict_slide(model_logits(model), x, crop=(32, 64), stride=(32, 32))
    assert tiled.shape == whole.shape and not torch.equal(tiled, whole)
    with pytest.raises(ValueError, match='mode'): evaluate(model, val, mode='flip')
