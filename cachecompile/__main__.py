"""``python -m cachecompile``: see :mod:`cachecompile.tools.cli`."""

import sys

from cachecompile.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
