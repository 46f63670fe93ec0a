"""URL mixin: a backend's URL opens an equal backend, unknown options are refused, repr hides secrets.

This module may import only ``lmcache``'s public contract and the suite's own test dependencies.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import pytest

import lmcache
from lmcache.errors import ConfigError

from .base import SuiteBase

__all__ = ["UrlTests"]


class UrlTests(SuiteBase):
    """URLs and identity.

    Fixtures: ``secret_url`` (optional) is a URL holding a password or a secret option; without
    it the redaction test skips.
    """

    @pytest.mark.asyncio
    async def test_url_round_trip(self) -> None:
        async with self.fresh_backend() as b:
            url = b.url
            assert isinstance(url, str) and "://" in url
            cls = type(b)
            assert urlsplit(url).scheme in cls.schemes
            again = cls.from_url(url)
            try:
                assert type(again) is cls
                assert again.url == url
                assert not again.is_open, "from_url must not open the backend"
            finally:
                await again.aclose()
            opened = lmcache.open_backend(url)
            try:
                assert type(opened) is cls
                assert opened.url == url
            finally:
                await opened.aclose()

    @pytest.mark.asyncio
    async def test_from_url_rejects_unknown_option(self) -> None:
        async with self.fresh_backend() as b:
            parts = urlsplit(b.url)
            sep = "&" if parts.query else "?"
            base = b.url.split("#", 1)[0]
            with pytest.raises(ConfigError):
                type(b).from_url(f"{base}{sep}no_such_option_for_conformance=1")

    @pytest.mark.asyncio
    async def test_repr_redacts_secrets(self) -> None:
        url = self._fixture("secret_url")
        if url is None:
            pytest.skip("no secret_url fixture: define one returning a URL with a password or secret option")
        async with self.fresh_backend() as probe:
            cls = type(probe)  # the class under test, which make_backend may choose
        parts = urlsplit(url)
        secrets = [parts.password] if parts.password else []
        secrets += [v for k, v in parse_qsl(parts.query) if k in cls.secret_options and v]
        assert secrets, f"secret_url {url!r} holds no password and no option listed in {cls.__name__}.secret_options"
        b = cls.from_url(url)
        try:
            for text in (repr(b), str(b), f"{b!r:>10}"):
                for secret in secrets:
                    assert secret not in text, f"{cls.__name__}'s repr shows a secret"
        finally:
            await b.aclose()
