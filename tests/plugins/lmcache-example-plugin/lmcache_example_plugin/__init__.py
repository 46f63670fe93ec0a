"""An example third-party lmcache backend serving ``example://NAME`` (see ``backend``).

Importing this package stays cheap: lmcache loads ``backend`` only when an ``example://`` URL
is opened, through the ``lmcache.backends`` entry point.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
