"""``nixl+posix:///abs/dir`` (or ``nixl:///abs/dir?backend=posix``): NIXL's POSIX backend as a file store.

The ``file://`` layout, frames, index, atomic publication and capacity rules
(:class:`NixlPosixBackend` subclasses :class:`~lmcache.backends.file.FileBackend`), with every
read and write of file bytes done as a NIXL DRAM↔FILE transfer. ``o_direct`` is not offered
(the plugin does its own I/O). Every NIXL call runs on the backend's executor, never on the
event loop.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from typing import Any, ClassVar

import numpy as np

from lmcache.backends.buffers import buffer_address
from lmcache.backends.concurrency import run_blocking
from lmcache.backends.file import FileBackend, FileSettings
from lmcache.backends.nixl.sdk import import_nixl, make_agent, registered, transfer
from lmcache.config import setting
from lmcache.errors import BackendError, ConfigError

__all__ = ["NixlPosixBackend", "NixlPosixSettings"]


@dataclasses.dataclass(frozen=True)
class NixlPosixSettings(FileSettings):
    """Options of ``nixl+posix://``: those of ``file://`` (``o_direct`` must stay false), plus ``timeout``."""

    timeout: float = setting(30.0, doc="Seconds to wait for one NIXL file transfer.", min=0.001)


class NixlPosixBackend(FileBackend):
    """``file://``'s store and format, with file bytes moved by NIXL's POSIX backend (DRAM↔FILE)."""

    schemes: ClassVar[tuple[str, ...]] = ("nixl+posix",)
    settings_cls: ClassVar[type[FileSettings]] = NixlPosixSettings
    settings: NixlPosixSettings

    def __init__(self, settings: FileSettings) -> None:
        # Plain FileSettings become NixlPosixSettings in FileBackend.__init__ (settings_cls).
        if settings.o_direct:
            raise ConfigError("nixl+posix://: o_direct is not supported (NIXL's POSIX backend does its own I/O)")
        super().__init__(settings)
        self._agent: Any = None
        self._agent_name = ""

    def _url_items(self) -> list[tuple[str, str]]:
        items = super()._url_items()
        if self.settings.timeout != NixlPosixSettings.timeout:
            items.append(("timeout", f"{self.settings.timeout:g}"))
        return items

    async def _open(self) -> None:
        import_nixl()
        await super()._open()
        self._agent_name = f"lmcache-nixl-posix-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self._agent = await run_blocking(self._executor, make_agent, self._agent_name, ["POSIX"], False)
        except BaseException:
            await super()._close()
            raise

    async def _close(self) -> None:
        await super()._close()
        self._agent = None

    def _extra_stats(self) -> dict[str, Any]:
        return {**super()._extra_stats(), "nixl_backend": "POSIX"}

    def _xfer(self, agent: Any, op: str, local: list[tuple[int, int, int]], remote: list[tuple[int, int, int]]) -> None:
        transfer(
            agent,
            op,
            local=local,
            local_type="DRAM",
            remote=remote,
            remote_type="FILE",
            remote_agent=self._agent_name,
            timeout=self.settings.timeout,
        )

    def _read_at(self, fd: int, view: memoryview, offset: int, want: int) -> int:
        size = os.fstat(fd).st_size
        want = max(0, min(want, size - offset, view.nbytes))
        if want == 0:
            return 0
        addr = buffer_address(view)
        agent = self._agent
        try:
            with registered(agent, [(addr, want, 0)], "DRAM"), registered(agent, [(offset, want, fd)], "FILE"):
                self._xfer(agent, "READ", [(addr, want, 0)], [(offset, want, fd)])
        except BackendError as exc:
            raise OSError(5, f"NIXL POSIX read failed: {exc}") from None  # the file path maps OSError
        return want

    def _write_frame(self, fd: int, header: bytes, src: memoryview, total: int) -> None:
        head = np.frombuffer(header, dtype=np.uint8)
        haddr, hlen = buffer_address(head), len(header)
        local = [(haddr, hlen, 0)]
        remote = [(0, hlen, fd)]
        if src.nbytes:
            local.append((buffer_address(src), src.nbytes, 0))
            remote.append((hlen, src.nbytes, fd))
        agent = self._agent
        try:
            with registered(agent, local, "DRAM"), registered(agent, [(0, total, fd)], "FILE"):
                self._xfer(agent, "WRITE", local, remote)
        except BackendError as exc:
            raise OSError(5, f"NIXL POSIX write failed: {exc}") from None
        size = os.fstat(fd).st_size
        if size != total:
            raise OSError(5, f"NIXL POSIX write left {size} of {total} bytes")
