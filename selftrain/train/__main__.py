"""One rank of a stage started by accelerate (selftrain.train.launch): ``python -m selftrain.train --worker RUN_DIR
KIND START RESULT``."""

import sys

from selftrain.train.stage import _worker

if sys.argv[1:2] != ["--worker"] or len(sys.argv) != 6:
    sys.exit("usage: python -m selftrain.train --worker RUN_DIR KIND START RESULT (started by selftrain.train.launch)")
_worker(sys.argv[2:])
