"""A blocking, raw lm:// protocol client for tests: sends exactly the frames a test asks for.

It is the bypass path of the conformance hooks (corrupting a stored value without the backend
under test) and the tool of the bad-input tests (garbage, oversized frames, wrong tokens).
"""

from __future__ import annotations

import socket
from typing import Any

from lmcache.server import protocol as P


class RawClient:
    """One blocking connection speaking the frame format of :mod:`lmcache.server.protocol`."""

    def __init__(self, address: tuple[str, int] | str, timeout: float = 10.0) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self._id = 0

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, op: int, meta: dict[str, Any], data: bytes = b"", flags: int = 0) -> int:
        self._id += 1
        self.sock.sendall(P.encode_frame_head(op, self._id, P.encode_meta(meta), len(data), flags) + data)
        return self._id

    def _exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed by the server")
            out += chunk
        return bytes(out)

    def recv(self) -> tuple[P.FrameHead, dict[str, Any], bytes]:
        """One reply frame: header, meta and data."""
        fh = P.parse_frame_head(self._exact(P.HEADER_BYTES), 1 << 30, 1 << 40)
        meta = P.decode_meta(self._exact(fh.meta_len))
        return fh, meta, self._exact(fh.data_len)

    def call(self, op: int, meta: dict[str, Any], data: bytes = b"") -> tuple[dict[str, Any], bytes]:
        """Send a request and return its reply; an error reply raises the mapped exception."""
        rid = self.send(op, meta, data)
        fh, rmeta, rdata = self.recv()
        assert fh.request_id == rid and fh.flags & P.FLAG_REPLY
        if fh.flags & P.FLAG_ERROR:
            raise P.error_from_reply(rmeta)
        return rmeta, rdata

    def closed_by_server(self) -> bool:
        """True when the server has closed this connection (EOF)."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, OSError):
            return True

    def hello(self, token: str | None = None) -> dict[str, Any]:
        meta: dict[str, Any] = {"client": "rawclient"}
        if token is not None:
            meta["token"] = token
        return self.call(P.Op.HELLO, meta)[0]

    def ping(self) -> None:
        self.call(P.Op.PING, {})

    def stats(self) -> dict[str, Any]:
        return self.call(P.Op.STATS, {})[0]["stats"]

    def get_frame(self, key: str, cap: int) -> bytes | None:
        meta, data = self.call(P.Op.GET, {"keys": [key], "caps": [cap]})
        return None if meta["sizes"][0] is None else data

    def put_frame(self, key: str, frame: bytes) -> str:
        meta, _ = self.call(P.Op.PUT, {"keys": [key], "sizes": [len(frame)]}, frame)
        return meta["results"][0][0]

    def delete(self, keys: list[str]) -> None:
        self.call(P.Op.DELETE, {"keys": keys})
