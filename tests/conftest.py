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
