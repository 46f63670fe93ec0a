"""Collection rules for ``tests/plugins``.

The example plugin's own tests (``lmcache-example-plugin/tests``) import the plugin, as a plugin
author's tests do: where it is not installed they are left out, like the other plugin tests here
that skip with the install command.
"""

from __future__ import annotations

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("lmcache_example_plugin") else ["lmcache-example-plugin/*"]
