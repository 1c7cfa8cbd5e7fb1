import os
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')

from pathlib import Path
import pytest


@pytest.fixture(scope='session')
def toy(tmp_path_factory) -> Path:
    """The tiny toy benchmark, made the way a user makes it (`blda toy --size tiny`, then `blda prepare` on
    both domains, through the CLI); shared read-only by the data and training tests."""
    from blda.cli import main
    root = tmp_path_factory.mktemp('toy')
    assert main(['toy', str(root), '--size', 'tiny', '--seed', '3']) == 0
    assert main(['prepare', 'gta', str(root/'source'), '--quiet']) == 0
    assert main(['prepare', 'cityscapes', str(root/'target'), '--quiet']) == 0
    return root


def train_once_and_resumed(cfg, stop_after: int = 2):
    """`cfg` trained in one go, and again in a sibling folder `twice` stopped after `stop_after` iterations
    and resumed (warnings of rare-class sampling about classes absent from the tiny toy silenced)."""
    import dataclasses, warnings
    from blda.train import train
    resumed = dataclasses.replace(cfg, output_dir=str(Path(cfg.output_dir).parent/'twice'))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        once = train(cfg)
        train(dataclasses.replace(resumed, stop_after=stop_after))
        twice = train(resumed)
    return once, twice


def assert_same_state(once, twice, keys=('student', 'teacher')) -> None:
    "The `keys` parts of two `TrainResult`s' states are equal tensor for tensor."
    import torch
    a, b = once.state.state_dict(), twice.state.state_dict()
    for key in keys:
        for name in a[key]: assert torch.equal(a[key][name], b[key][name]), (key, name)
