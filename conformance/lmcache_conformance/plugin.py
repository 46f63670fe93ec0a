"""pytest plugin: registers the conformance suite's options and markers."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--lmcache-backend-url`` for the zero-code mode."""
    group = parser.getgroup("lmcache", "lmcache backend conformance")
    group.addoption(
        "--lmcache-backend-url",
        action="store",
        default=None,
        help="Run the lmcache conformance suite against this backend URL.",
    )
