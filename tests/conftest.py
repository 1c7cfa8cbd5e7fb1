import os
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')

from pathlib import Path
import pytest


@pytest.fixture(scope='session')
def toy(tmp_path_factory) -> Path:
    """The tiny toy benchmark, made the way a user makes it (`blda toy --size tiny`, then `blda prepare` on
    both domains and the held-out source split, through the CLI); shared read-only by the data and training tests."""
    from blda.cli import main
    root = tmp_path_factory.mktemp('toy')
    assert main(['toy', str(root), '--size', 'tiny', '--seed', '3']) == 0
    assert main(['prepare', 'gta', str(root/'source'), '--quiet']) == 0
    assert main(['prepare', 'gta', str(root/'source_val'), '--quiet']) == 0
    assert main(['prepare', 'cityscapes', str(root/'target'), '--quiet']) == 0
    return root


@pytest.fixture(scope='session')
def real_toy(tmp_path_factory) -> Path:
    """`blda toy --size real`: a handful of images at GTA5's (1914×1052) and Cityscapes' (2048×1024) sizes and layouts,
    prepared like the tiny toy; the real datasets' roots point at its `source/` and `target/` in tests of the real path."""
    from blda.cli import main
    root = tmp_path_factory.mktemp('real')
    assert main(['toy', str(root), '--size', 'real']) == 0
    for kind, folder in (('gta', 'source'), ('gta', 'source_val'), ('cityscapes', 'target')):
        assert main(['prepare', kind, str(root/folder), '--quiet']) == 0
    return root


def disk_full() -> OSError:
    "The error a full disk raises on a write."
    import errno
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullDisk:
    "A writable file (wrapping `f`) whose disk fills up once more than `room` bytes are written."
    def __init__(self, f, room: int): self.f, self.room = f, room
    def writable(self): return True
    def write(self, b):
        if len(b) > self.room: raise disk_full()
        self.room -= len(b); return self.f.write(b)


def train_quietly(cfg):
    "`blda.train.train(cfg)` with rare-class sampling's warnings about classes absent from the tiny toy silenced."
    import warnings
    from blda.train import train
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return train(cfg)


def checked_train_log(res, iterations: int, expected: set) -> list:
    "The training rows of `res.log`, after checking there are `iterations` of them and each logs every `expected` loss, finite."
    import math
    train_log = [r for r in res.log if r['kind'] == 'train']
    assert res.iteration == iterations and len(train_log) == iterations
    for r in train_log:
        assert expected <= set(r) and all(math.isfinite(r[k]) for k in expected)
    return train_log


def train_once_and_resumed(cfg, stop_after: int = 2):
    """`cfg` trained in one go, and again in a sibling folder `twice` stopped after `stop_after` iterations
    and resumed (see `train_quietly`)."""
    import dataclasses
    resumed = dataclasses.replace(cfg, output_dir=str(Path(cfg.output_dir).parent/'twice'))
    once = train_quietly(cfg)
    train_quietly(dataclasses.replace(resumed, stop_after=stop_after))
    return once, train_quietly(resumed)


def assert_same_state(once, twice, keys=('student', 'teacher')) -> None:
    "The `keys` parts of two `TrainResult`s' states are equal tensor for tensor."
    import torch
    a, b = once.state.state_dict(), twice.state.state_dict()
    for key in keys:
        for name in a[key]: assert torch.equal(a[key][name], b[key][name]), (key, name)
