"""`blda.train` in two gloo processes on the CPU (what `torchrun --nproc_per_node 2 -m blda train …` runs).

The workers are started by `torch.multiprocessing.spawn` with torchrun's environment variables, so `train`
joins (and afterwards leaves) the process group itself. A tiny DAFormer + BLDA run on the toy benchmark
(MiT-B0, 32×32 crops, a low pseudo-label threshold so the target grid is updated): both ranks must end with
the same tracker, student and teacher, only rank 0 writes files, and a run stopped halfway and resumed by
two processes equals the uninterrupted one bit for bit."""
import dataclasses, os, socket, warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from blda.cli import main
from blda.train import TIMING_KEYS, TrainConfig, read_log, train

ITERATIONS = 4


@pytest.fixture(scope='module')
def toy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('toy')
    assert main(['toy', str(root), '--size', 'tiny', '--seed', '3']) == 0
    assert main(['prepare', 'gta', str(root/'source'), '--quiet']) == 0
    assert main(['prepare', 'cityscapes', str(root/'target'), '--quiet']) == 0
    return root


def config(toy: Path, out: Path, **kw) -> TrainConfig:
    base = dict(host='daformer', blda=True, encoder='mit_b0', data='toy', source_root=str(toy/'source'),
                target_root=str(toy/'target'), crop_size=(32, 32), batch_size=1, iterations=ITERATIONS,
                warmup_iters=2, lr=1e-3, log_interval=1, eval_interval=ITERATIONS, checkpoint_interval=0,
                min_pixels=10, rcs_min_pixels=10, pseudo_threshold=0.3, output_dir=str(out), progress=False,
                device='cpu')
    return TrainConfig(**(base | kw))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _worker(rank: int, world: int, ports: list[int], configs: list[TrainConfig], dump: str) -> None:
    torch.set_num_threads(1)
    for port, cfg in zip(ports, configs):   # e.g. a run stopped halfway, then resumed
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')                               # RCS drops classes absent from the toy
            res = train(cfg)
        assert not torch.distributed.is_initialized()                     # train left the group it joined
    st = res.state
    torch.save(dict(iteration=res.iteration, log=res.log, student=st.student.state_dict(),
                    teacher=st.teacher.state_dict() if st.teacher is not None else {},
                    tracker=st.criterion.tracker.state_dict() if hasattr(st.criterion, 'tracker') else {},
                    generator=st.generator.get_state()), os.path.join(dump, f'rank{rank}.pt'))


def run_ddp(configs: list[TrainConfig], dump: Path, world: int = 2) -> list[dict]:
    "Each rank runs `train` on `configs` in turn; returns every rank's final state."
    dump.mkdir(parents=True, exist_ok=True)
    ports = [_free_port() for _ in configs]
    mp.spawn(_worker, args=(world, ports, configs, str(dump)), nprocs=world, join=True)
    return [torch.load(dump/f'rank{r}.pt', weights_only=False) for r in range(world)]


def untimed(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in log]


@pytest.fixture(scope='module')
def uninterrupted(toy, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp('ddp')
    return out/'run', run_ddp([config(toy, out/'run')], out/'dump')


def test_two_gloo_processes_stay_in_sync(uninterrupted):
    out, (r0, r1) = uninterrupted
    assert r0['iteration'] == r1['iteration'] == ITERATIONS
    tracker = r0['tracker']
    assert tracker['source_updates'].sum() > 0 and tracker['target_updates'].sum() > 0
    for part in ('tracker', 'student', 'teacher'):
        for k, v in r0[part].items():
            assert torch.equal(v, r1[part][k]), (part, k)
    assert not torch.equal(r0['generator'], r1['generator'])             # the ranks draw their own augmentations
    # only rank 0 writes: one checkpoint, one log (with the evaluation), one config
    assert sorted(p.name for p in out.iterdir()) == ['checkpoint.pt', 'config.json', 'metrics.jsonl']
    log = read_log(out/'metrics.jsonl')
    assert [r['kind'] for r in log] == ['train'] * ITERATIONS + ['eval']
    train_part = lambda L: untimed([r for r in L if r['kind'] == 'train'])
    assert train_part(r0['log']) == train_part(r1['log']) == train_part(log)   # losses averaged over the ranks
    ckpt = torch.load(out/'checkpoint.pt', weights_only=True)
    assert ckpt['world_size'] == 2 and len(ckpt['ranks']) == 2
    for k, v in ckpt['state']['student'].items():
        assert torch.equal(v, r0['student'][k]), k


def test_two_processes_resume_exactly(toy, tmp_path, uninterrupted):
    "Stopped halfway and resumed (each rank with its own random streams): the same run, bit for bit."
    out, (u0, _) = uninterrupted
    cfg = config(toy, tmp_path/'run')
    r0, r1 = run_ddp([dataclasses.replace(cfg, stop_after=ITERATIONS // 2), cfg], tmp_path/'dump')
    for part in ('tracker', 'student', 'teacher'):
        for k, v in u0[part].items():
            assert torch.equal(v, r0[part][k]) and torch.equal(v, r1[part][k]), (part, k)
    assert untimed(read_log(tmp_path/'run'/'metrics.jsonl')) == untimed(read_log(out/'metrics.jsonl'))
    with pytest.raises(ValueError, match='process'):                     # another number of processes: refused
        train(dataclasses.replace(cfg, iterations=ITERATIONS, stop_after=None))
