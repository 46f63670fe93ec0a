"""Keep credentials out of logs: a filter that scrubs secret header and option values from records.

At debug level, SDKs log whole requests. botocore prints the signed request (its headers,
``X-Amz-Security-Token`` and ``Authorization`` among them), the canonical request it signed (a
``x-amz-security-token:<token>`` line) and the signature; a session token is a bearer
credential, so ``lmcache -vv`` must not write it to a terminal or a log file.
:class:`RedactingFilter` rewrites each record that passes a handler: the formatted message
(``msg % args``), the exception text and the stack text, with every value of a secret name
replaced by ``***``. It does not depend on which library logged the record or under which
logger name; it recognises these shapes (names case-insensitive):

* a quoted key in a ``repr``: ``'X-Amz-Security-Token': b'…'`` (botocore's headers dict);
* a header line: ``Authorization: AWS4-HMAC-SHA256 Credential=…`` (the whole rest of the line);
* ``name=value`` in a query string or option list: ``X-Amz-Signature=…&``;
* ``name: value`` inside a line, and botocore's ``Signature:`` followed by the value on the
  next line.

Secret names: :data:`SECRET_NAMES`. Records without a secret are left untouched.

The filter sits on *handlers*, not loggers: a logger's filters see only records created by that
very logger, while a handler sees every record that reaches it (``botocore.endpoint``,
``botocore.auth``, ``urllib3``…). :func:`install_redaction` adds it to the root logger's
handlers; ``lmcache``'s command line calls it after setting up logging, and an application that
embeds lmcache and logs at debug level may call it after its own logging setup (it is
idempotent). Without that, :func:`protect_loggers` covers the known case: backends that use an
SDK which logs requests (``s3://`` and botocore) put the filter on the SDK's loggers that
create such records (:data:`SDK_LOGGERS`) when they are imported, which protects every handler
those records reach, whoever configured it. This module imports nothing outside the standard
library.
"""

from __future__ import annotations

import logging
import re

__all__ = ["SDK_LOGGERS", "SECRET_NAMES", "RedactingFilter", "install_redaction", "protect_loggers", "scrub"]

#: Header, query and option names whose values are credentials (matched case-insensitively).
SECRET_NAMES: tuple[str, ...] = (
    "x-amz-security-token",
    "x-amz-signature",
    "x-amz-credential",
    "authorization",
    "proxy-authorization",
    "aws_session_token",
    "aws_secret_access_key",
    "secret_access_key",
    "session_token",
    "security-token",
    "password",
)
#: Loggers whose debug records carry credentials (signed requests, canonical requests,
#: signatures). A logger's filter sees the records created by that very logger, so each is named.
SDK_LOGGERS: dict[str, tuple[str, ...]] = {
    "botocore": (
        "botocore.auth",
        "botocore.endpoint",
        "botocore.awsrequest",
        "botocore.httpsession",
        "botocore.parsers",
        "botocore.hooks",
        "botocore.retryhandler",
        "urllib3.connectionpool",
    ),
}
#: What a secret value becomes.
REDACTED = "***"

_AUTH_SCHEMES = "bearer|basic|digest|negotiate|token|aws4-hmac-sha256|aws"
_NAMES = "|".join(re.escape(n) for n in sorted(SECRET_NAMES, key=len, reverse=True))
# Each pattern keeps the name and separator (group 1) and replaces the value. Order matters:
# quoted repr values first (their values may hold spaces and separators), then whole header
# lines, then the shorter inline forms.
_PATTERNS: tuple[re.Pattern[str], ...] = (
    # 'X-Amz-Security-Token': b'…'   "authorization": "…"
    re.compile(rf"""((['"])(?:{_NAMES})\2\s*:\s*b?(['"]))(?:\\.|(?!\3).)*""", re.IGNORECASE),
    # a header line: "Authorization: AWS4-HMAC-SHA256 Credential=…, Signature=…"
    re.compile(rf"(^[ \t]*(?:{_NAMES})[ \t]*:[ \t]*)[^\r\n]*", re.IGNORECASE | re.MULTILINE),
    # botocore.auth: "Signature:\n<hex>"
    re.compile(r"(\bsignature:[ \t]*\r?\n[ \t]*)[^\s'\"]+", re.IGNORECASE),
    # query strings and option lists: "X-Amz-Signature=…&", "Credential=AKIA…/…,"
    re.compile(rf"((?<![\w-])(?:{_NAMES}|credential|signature)=)[^&\s'\",;]*", re.IGNORECASE),
    # inline "name: value", where an Authorization value starts with its scheme ("Bearer …")
    re.compile(
        rf"((?<![\w-])(?:{_NAMES})[ \t]*:[ \t]*)(?!\*\*\*)(?:(?:{_AUTH_SCHEMES})[ \t]+)?[^\s'\",;]+",
        re.IGNORECASE,
    ),
)


def scrub(text: str) -> str:
    """``text`` with the value of every secret header or option replaced by ``***``."""
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


class RedactingFilter(logging.Filter):
    """A handler filter that scrubs secrets from each record's message, exception and stack text.

    It never drops a record. A record that holds a secret has its ``msg`` replaced by the
    scrubbed, fully formatted message and its ``args`` cleared, so a later formatter cannot put
    the secret back.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Scrub ``record`` in place; always True (keep the record)."""
        try:
            message = record.getMessage()
        except Exception:
            return True  # a malformed record: the handler reports it as logging always does
        clean = scrub(message)
        if clean != message:
            record.msg = clean
            record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


def install_redaction(logger: logging.Logger | None = None) -> RedactingFilter:
    """Add a :class:`RedactingFilter` to every handler of ``logger`` (default: the root logger).

    Idempotent: a handler that already has one is left as it is. Call it after the handlers
    exist (after ``logging.basicConfig`` or ``dictConfig``).

    Returns:
        The filter (shared by the handlers it was added to).
    """
    target = logger if logger is not None else logging.getLogger()
    redacting = RedactingFilter()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(redacting)
    return redacting


def protect_loggers(names: tuple[str, ...] | list[str]) -> None:
    """Add a :class:`RedactingFilter` to each named logger (idempotent).

    Records created by those loggers are scrubbed before any handler sees them, wherever the
    handlers are (a logger's filters do not apply to records of its child loggers, so name each).
    """
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())
