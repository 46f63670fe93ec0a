"""The log filter that keeps credentials out of log records (lmcache.logfilter)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from lmcache.logfilter import RedactingFilter, install_redaction, scrub

TOKEN = "FwoGZXIvYXdzEXAMPLESESSIONTOKEN/with+slashes=="
SIGNATURE = "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
ACCESS_KEY = "AKIDEXAMPLEKEYID"

# The shapes botocore's debug log uses (botocore.endpoint, botocore.auth), plus query strings.
PREPARED_REQUEST = (
    "<AWSPreparedRequest stream_output=False, method=PUT, url=http://127.0.0.1:1/b/k, headers={"
    f"'User-Agent': b'Boto3/1.35', 'X-Amz-Security-Token': b'{TOKEN}', 'Authorization': "
    f"b'AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/20250101/us-east-1/s3/aws4_request, "
    f"SignedHeaders=host;x-amz-date;x-amz-security-token, Signature={SIGNATURE}', 'Content-Length': '5'}}>"
)
CANONICAL_REQUEST = (
    "PUT\n/b/k\n\nhost:127.0.0.1:1\nx-amz-date:20250101T000000Z\n"
    f"x-amz-security-token:{TOKEN}\n\nhost;x-amz-date;x-amz-security-token\nUNSIGNED-PAYLOAD"
)
PRESIGNED = (
    f"http://h/b/k?X-Amz-Credential={ACCESS_KEY}%2F2025&X-Amz-Security-Token={TOKEN}&X-Amz-Signature={SIGNATURE}"
)


@pytest.mark.parametrize(
    "text",
    [
        PREPARED_REQUEST,
        CANONICAL_REQUEST,
        f"Signature:\n{SIGNATURE}",
        PRESIGNED,
        f"Authorization: AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/x, Signature={SIGNATURE}",
        f'{{"authorization": "Bearer {TOKEN}", "x-amz-security-token": "{TOKEN}"}}',
        f"settings aws_session_token={TOKEN}, aws_secret_access_key: {TOKEN}",
    ],
)
def test_scrub_removes_every_secret_value(text: str) -> None:
    clean = scrub(text)
    for secret in (TOKEN, SIGNATURE, ACCESS_KEY):
        assert secret not in clean, clean
    assert "***" in clean


def test_scrub_keeps_ordinary_text() -> None:
    text = "SignedHeaders=host;x-amz-date;x-amz-security-token password_file=/run/secret ok: 5 keys"
    assert scrub(text) == text


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger with a filtered handler writing to a buffer, and a child that propagates to it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    parent = logging.getLogger("test_logfilter")
    parent.addHandler(handler)
    parent.setLevel(logging.DEBUG)
    parent.propagate = False
    install_redaction(parent)
    try:
        yield parent, stream
    finally:
        parent.removeHandler(handler)


def test_filter_scrubs_args_messages_exceptions_and_child_loggers(captured: tuple[logging.Logger, io.StringIO]) -> None:
    parent, stream = captured
    child = logging.getLogger("test_logfilter.botocore.endpoint")  # records created elsewhere reach the handler
    child.debug("Sending http request: %s", PREPARED_REQUEST)  # the secret is in args
    child.debug("CanonicalRequest:\n%s", CANONICAL_REQUEST.encode().decode())
    parent.debug(f"inline x-amz-security-token: {TOKEN}")  # the secret is in msg itself
    parent.debug("bytes arg %r", {"X-Amz-Security-Token": TOKEN.encode()})
    try:
        raise ValueError(f"request failed with Authorization: Bearer {TOKEN}")
    except ValueError:
        parent.exception("boom")
    parent.debug("nothing secret here: %d values", 3)
    out = stream.getvalue()
    assert TOKEN not in out and SIGNATURE not in out and ACCESS_KEY not in out, out
    assert out.count("***") >= 6
    assert "nothing secret here: 3 values" in out
    assert "ValueError" in out  # the traceback is kept, only the secret goes


def test_install_is_idempotent_and_never_drops_records() -> None:
    logger = logging.getLogger("test_logfilter.idempotent")
    handler = logging.StreamHandler(io.StringIO())
    logger.addHandler(handler)
    try:
        install_redaction(logger)
        install_redaction(logger)
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    finally:
        logger.removeHandler(handler)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%s %s", ("one",), None)  # malformed
    assert RedactingFilter().filter(record) is True


def test_the_s3_backend_scrubs_botocore_records_at_their_source() -> None:
    import lmcache.backends.s3  # noqa: F401 - importing it protects botocore's loggers

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # an application's handler, without our filter
    sdk = logging.getLogger("botocore")
    old_level = sdk.level
    sdk.addHandler(handler)
    sdk.setLevel(logging.DEBUG)
    try:
        logging.getLogger("botocore.endpoint").debug("Sending http request: %s", PREPARED_REQUEST)
        logging.getLogger("botocore.auth").debug("CanonicalRequest:\n%s", CANONICAL_REQUEST)
        logging.getLogger("botocore.auth").debug("Signature:\n%s", SIGNATURE)
    finally:
        sdk.removeHandler(handler)
        sdk.setLevel(old_level)
    out = stream.getvalue()
    assert "X-Amz-Security-Token" in out
    assert TOKEN not in out and SIGNATURE not in out and ACCESS_KEY not in out, out
