"""``python -m lmcache``: the same as the ``lmcache`` command."""

from __future__ import annotations

import sys

from lmcache.cli import main

if __name__ == "__main__":
    sys.exit(main())
