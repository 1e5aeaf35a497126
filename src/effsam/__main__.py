"""``python -m effsam``: the same command as ``effsam``."""

import sys

from effsam.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
