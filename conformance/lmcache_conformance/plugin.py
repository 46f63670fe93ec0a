"""pytest plugin (entry point ``pytest11``): the conformance suite's option and markers.

It is loaded in every pytest run where lmcache is installed, so it only adds an option and a
marker; it defines no fixtures (no name clashes) and imports nothing heavy.
"""

from __future__ import annotations

import pytest

__all__ = ["BACKEND_URL_OPTION", "pytest_addoption", "pytest_configure"]

#: Command-line option naming the URL the zero-code suite runs against.
BACKEND_URL_OPTION = "--lmcache-backend-url"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--lmcache-backend-url`` for the zero-code mode."""
    group = parser.getgroup("lmcache", "lmcache backend conformance")
    group.addoption(
        BACKEND_URL_OPTION,
        action="store",
        default=None,
        metavar="URL",
        help=(
            "Run the lmcache conformance suite against this backend URL: "
            "pytest --pyargs lmcache_conformance --lmcache-backend-url=URL. "
            "It stores only fresh random keys and deletes them after each test, but a failing "
            "backend can leave some behind: point it at a scratch location (an empty directory, "
            "bucket prefix or database), never at data you keep."
        ),
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the suite's marker so ``--strict-markers`` projects can run it."""
    config.addinivalue_line("markers", "lmcache_conformance: a test of the lmcache StorageBackend conformance suite")
