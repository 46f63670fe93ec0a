r"""A small prefill/decode proxy for vLLM instances running lmcache's connector (aiohttp).

Run it in front of one or more prefill instances (``kv_role: kv_producer``) and decode instances
(``kv_consumer``)::

    python -m lmcache.integrations.vllm.pd_proxy --port 9000 \\
        --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200

For each ``POST /v1/completions`` or ``/v1/chat/completions`` it:

1. sends the request to a prefill instance (round robin) with ``max_tokens: 1``, no streaming and
   ``kv_transfer_params: {"do_remote_decode": true, "lmcache_transfer_id": <fresh id>}``;
2. sends the original request to a decode instance (round robin) with the ``kv_transfer_params``
   the prefill instance answered (they name the transfer the decoder loads);
3. returns the decoder's answer as it comes (streamed when the client asked for a stream).

This is vLLM's own PD protocol (the one vLLM's NIXL toy proxy and ``vllm-router
--vllm-pd-disaggregation`` speak), so any of them works with lmcache's connector too. When the
prefill instance fails or does not answer within ``--prefill-timeout``, the request goes to the
decoder without transfer params (it prefills itself) unless ``--on-prefill-error fail`` is given
(the client then gets ``502``). ``GET /health`` answers when every backend does; other ``GET``
paths (``/v1/models``…) are passed to a decode instance. Headers other than ``Authorization`` and
``Content-Type`` are not passed on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import uuid
from collections.abc import Sequence
from typing import Any

from lmcache.errors import InvalidArgumentError, MissingDependencyError

try:
    import aiohttp
    from aiohttp import web
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError("aiohttp", "server", "lmcache.integrations.vllm.pd_proxy") from exc

__all__ = ["PDProxy", "main", "prefill_request"]

logger = logging.getLogger(__name__)

#: Client request headers passed on to the instances.
_PASSED_HEADERS = ("Authorization", "Content-Type")


def prefill_request(body: dict[str, Any], transfer_id: str) -> dict[str, Any]:
    """The prefill instance's version of a client request: one token, no stream, a transfer asked for.

    Raises:
        InvalidArgumentError: ``body`` is not a JSON object.
    """
    if not isinstance(body, dict):
        raise InvalidArgumentError("the request body must be a JSON object")
    out = dict(body)
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["stream"] = False
    for key in ("stream_options", "min_tokens"):
        out.pop(key, None)
    out["kv_transfer_params"] = {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "lmcache_transfer_id": transfer_id,
    }
    return out


class PDProxy:
    """Routes requests through a prefill instance and then a decode instance.

    Args:
        prefill: Base URLs of the prefill instances (``http://host:port``).
        decode: Base URLs of the decode instances.
        prefill_timeout: Seconds a prefill may take before the request goes on without it.
        on_prefill_error: ``"decode"`` (the decoder prefills itself) or ``"fail"`` (``502``).

    Raises:
        InvalidArgumentError: No instance of a kind, or a bad ``on_prefill_error``.
    """

    def __init__(
        self,
        prefill: Sequence[str],
        decode: Sequence[str],
        *,
        prefill_timeout: float = 300.0,
        on_prefill_error: str = "decode",
    ) -> None:
        if not prefill or not decode:
            raise InvalidArgumentError("the proxy needs at least one prefill and one decode instance")
        if on_prefill_error not in ("decode", "fail"):
            raise InvalidArgumentError(f"on_prefill_error must be 'decode' or 'fail', got {on_prefill_error!r}")
        self.prefill = [u.rstrip("/") for u in prefill]
        self.decode = [u.rstrip("/") for u in decode]
        self.prefill_timeout = prefill_timeout
        self.on_prefill_error = on_prefill_error
        self._next_prefill = itertools.cycle(self.prefill)
        self._next_decode = itertools.cycle(self.decode)
        self._session: aiohttp.ClientSession | None = None
        self.counters = {"requests": 0, "prefill_errors": 0, "without_transfer": 0}

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self._handle)
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_get("/health", self._health)
        app.router.add_get("/{tail:.*}", self._passthrough)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app: web.Application) -> None:
        # No total timeout: a decode may stream for as long as it generates.
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))

    async def _stop(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    @staticmethod
    def _headers(request: web.Request) -> dict[str, str]:
        return {h: request.headers[h] for h in _PASSED_HEADERS if h in request.headers}

    async def _prefill(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any] | None:
        """Run the prefill; its ``kv_transfer_params``, or ``None`` when it failed."""
        assert self._session is not None
        url = next(self._next_prefill) + path
        req = prefill_request(body, uuid.uuid4().hex)
        try:
            async with self._session.post(
                url, json=req, headers=headers, timeout=aiohttp.ClientTimeout(total=self.prefill_timeout)
            ) as resp:
                if resp.status != 200:
                    logger.warning("prefill at %s answered %d: %s", url, resp.status, (await resp.text())[:300])
                    return None
                answer = await resp.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            logger.warning("prefill at %s failed: %r", url, exc)
            return None
        params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
        return params if isinstance(params, dict) else {}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.counters["requests"] += 1
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": {"message": "the body is not JSON"}}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": {"message": "the body must be a JSON object"}}, status=400)
        headers = self._headers(request)
        params = await self._prefill(request.path, body, headers)
        if params is None:
            self.counters["prefill_errors"] += 1
            if self.on_prefill_error == "fail":
                return web.json_response({"error": {"message": "the prefill instance failed"}}, status=502)
        decode_body = dict(body)
        if params:
            decode_body["kv_transfer_params"] = params
        else:
            self.counters["without_transfer"] += 1  # the decoder computes the prompt itself
            decode_body.pop("kv_transfer_params", None)
        return await self._forward(request, next(self._next_decode) + request.path, decode_body, headers)

    async def _forward(
        self, request: web.Request, url: str, body: dict[str, Any], headers: dict[str, str]
    ) -> web.StreamResponse:
        """Send ``body`` to ``url`` and stream the answer back as it comes."""
        assert self._session is not None
        try:
            async with self._session.post(url, json=body, headers=headers) as resp:
                out = web.StreamResponse(status=resp.status)
                out.content_type = resp.content_type
                await out.prepare(request)
                async for data in resp.content.iter_any():
                    await out.write(data)
                await out.write_eof()
                return out
        except aiohttp.ClientError as exc:
            logger.warning("decode at %s failed: %r", url, exc)
            return web.json_response({"error": {"message": f"the decode instance failed: {exc!r:.200}"}}, status=502)

    async def _health(self, _request: web.Request) -> web.Response:
        assert self._session is not None
        bad = []
        for base in (*self.prefill, *self.decode):
            try:
                async with self._session.get(base + "/health", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    if resp.status != 200:
                        bad.append(base)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                bad.append(base)
        if bad:
            return web.json_response({"unhealthy": bad}, status=503)
        return web.json_response({"ok": True})

    async def _passthrough(self, request: web.Request) -> web.Response:
        assert self._session is not None
        url = next(self._next_decode) + request.path_qs
        try:
            async with self._session.get(url, headers=self._headers(request)) as resp:
                return web.Response(status=resp.status, body=await resp.read(), content_type=resp.content_type)
        except aiohttp.ClientError as exc:
            return web.json_response({"error": {"message": f"the decode instance failed: {exc!r:.200}"}}, status=502)


def _write_ready(path: str, info: dict[str, Any]) -> None:
    """Write ``info`` to ``path`` whole (a reader never sees half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lmcache.integrations.vllm.pd_proxy``."""
    parser = argparse.ArgumentParser(
        prog="python -m lmcache.integrations.vllm.pd_proxy", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000, help="port to listen on; 0 picks a free one (default 9000)")
    parser.add_argument("--prefill", action="append", required=True, help="a prefill instance's base URL (repeatable)")
    parser.add_argument("--decode", action="append", required=True, help="a decode instance's base URL (repeatable)")
    parser.add_argument("--prefill-timeout", type=float, default=300.0, help="seconds a prefill may take (default 300)")
    parser.add_argument(
        "--on-prefill-error",
        choices=("decode", "fail"),
        default="decode",
        help="a failed prefill: let the decoder prefill (default) or answer 502",
    )
    parser.add_argument("--ready-file", help="write {host, port} as JSON here once listening")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    proxy = PDProxy(
        args.prefill, args.decode, prefill_timeout=args.prefill_timeout, on_prefill_error=args.on_prefill_error
    )

    async def serve() -> None:
        runner = web.AppRunner(proxy.app())
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        port = runner.addresses[0][1]
        logger.info(
            "lmcache PD proxy on http://%s:%d (prefill %s, decode %s)", args.host, port, proxy.prefill, proxy.decode
        )
        if args.ready_file:
            _write_ready(args.ready_file, {"host": args.host, "port": port})
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
