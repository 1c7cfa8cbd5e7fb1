"""Convert Cityscapes (ROOT/leftImg8bit, ROOT/gtFine) labels to train ids and write the rare-class statistics.

The same as `blda prepare cityscapes ROOT [--nproc N]`; kept for users of the reference `tools/convert_datasets`.
Usage: python data_prep/cityscapes.py ROOT [--nproc N] [--skip-bad] [--unknown-ids ignore] [--verify-images]
"""
import sys
from blda.cli import main

if __name__ == '__main__':
    sys.exit(main(['prepare', 'cityscapes', *sys.argv[1:]]))
