"""Convert GTA5 (ROOT/images, ROOT/labels) labels to train ids and write the rare-class statistics.

The same as `blda prepare gta ROOT [--nproc N]`; kept for users of the reference `tools/convert_datasets`.
Usage: python data_prep/gta.py ROOT [--nproc N] [--skip-bad] [--unknown-ids ignore] [--verify-images]
"""
import sys
from blda.cli import main

if __name__ == '__main__':
    sys.exit(main(['prepare', 'gta', *sys.argv[1:]]))
