"""`python -m selftrain <command>`: the command line (selftrain.cli)."""

import sys

from selftrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
