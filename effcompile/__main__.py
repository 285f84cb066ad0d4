"""``python -m effcompile``: the same CLI as the ``effcompile`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
