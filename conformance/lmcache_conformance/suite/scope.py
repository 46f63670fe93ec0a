"""Scope-isolation mixin: a key's model, world size, rank, dtype and tags are part of its identity.

This module may import only ``lmcache``'s public contract and the suite's own test dependencies.
"""

from __future__ import annotations

import pytest

from lmcache.backends.base import PutStatus, StorageBackend

from .base import SuiteBase
from .support import SCOPE_VARIANTS, expect_bytes, random_value, scoped_key

__all__ = ["ScopeIsolationTests"]


class ScopeIsolationTests(SuiteBase):
    """Two keys with one chunk hash in two scopes name two values (tenants never share KV)."""

    @pytest.mark.asyncio
    @pytest.mark.parametrize("field", list(SCOPE_VARIANTS))
    async def test_scope_is_part_of_key_identity(self, backend: StorageBackend, field: str) -> None:
        """Keys with one chunk hash in two scopes are two values: tenants never share KV."""
        mine = scoped_key()
        theirs = SCOPE_VARIANTS[field](mine)
        rule = f"scope isolation ({field}): a key that differs only in its {field}"
        mine_value, their_value = random_value(500), random_value(300)
        await self.put_all(backend, [mine], [mine_value])
        assert await backend.contains([theirs]) == [False], f"{rule} is reported held (another tenant's value)"
        got = await self.read(backend, theirs, 1024)
        assert got is None, f"{rule} read another tenant's value ({len(got or b'')} bytes)"
        assert await backend.lookup_prefix([theirs]) == 0, f"{rule} counts in lookup_prefix"
        results = await backend.put([theirs], [their_value])
        assert results[0].status is not PutStatus.EXISTS, f"{rule} collides with another tenant's key on put"
        if results[0].status is PutStatus.REJECTED:
            pytest.skip(f"{type(backend).__name__} rejected a value ({results[0].reason}); give it more capacity")
        expect_bytes(await self.read(backend, theirs, 1024), their_value, f"{rule} read the wrong value")
        expect_bytes(await self.read(backend, mine, 1024), mine_value, f"{rule} overwrote the first tenant's value")
        await backend.delete([theirs])
        assert await backend.contains([mine, theirs]) == [True, False], f"{rule}: deleting one deleted the other"
        expect_bytes(await self.read(backend, mine, 1024), mine_value, f"{rule}: delete changed the other value")
