"""Zero-code mode: the whole suite against ``--lmcache-backend-url``.

Run it with ``pytest --pyargs lmcache_conformance --lmcache-backend-url=URL``. Without the option
every test here skips.
"""

from __future__ import annotations

import pytest

from lmcache_conformance.plugin import BACKEND_URL_OPTION
from lmcache_conformance.suite import BackendTests


class TestBackendFromURL(BackendTests):
    @pytest.fixture
    def backend_url(self, request: pytest.FixtureRequest) -> str:
        try:
            url = request.config.getoption(BACKEND_URL_OPTION)
        except ValueError:  # the plugin was disabled with -p no:lmcache_conformance
            url = None
        if not url:
            pytest.skip(f"no backend URL: pass {BACKEND_URL_OPTION}=URL to run the conformance suite")
        return url
