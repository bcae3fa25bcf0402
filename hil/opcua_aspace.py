"""Fast asyncua server start: the standard address space from an on-disk shelf.

`Server.init()` builds the OPC UA standard address space (~6 200 nodes) from generated code on
every start: 2-5 s on a small machine, paid by every simulator start and restart. asyncua can load
it lazily from a `shelve` file instead (`Server.init(shelf_file=...)`; nodes are unpickled when
first touched). `new_server()` builds that shelf once per machine (per asyncua and Python version)
and starts every later server from it in ~0.2 s.

Details asyncua leaves to the caller:
  * asyncua decides "the shelf exists" by `path.is_file()` (or `path.db`): true for gdbm, false
    for `dbm.dumb` (files `path.dat` / `path.dir`, the only dbm in Pythons built without gdbm),
    which would rebuild (and rewrite) the shelf on every start. A marker file at `path` fixes it.
  * concurrent builders (pytest workers) must not see half-written shelves: each builds in its own
    temporary directory, renamed into place in one step; the loser discards its copy.
  * any failure (unwritable cache, a shelf that does not load) falls back to a plain `init()`.

The cache lives in `$DERGW_OPCUA_ASPACE_CACHE` if set, else in the system temporary directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from asyncua.server.server import Server

__all__ = ["CACHE_ENV", "aspace_cache_dir", "new_server"]

log = logging.getLogger(__name__)

CACHE_ENV = "DERGW_OPCUA_ASPACE_CACHE"
_SHELF = "aspace"


def aspace_cache_dir() -> Path:
    """The directory holding the shelf for this asyncua and Python version."""
    root = os.environ.get(CACHE_ENV)
    if root:
        base = Path(root)
    else:
        user = os.getuid() if hasattr(os, "getuid") else "user"
        base = Path(tempfile.gettempdir()) / f"dergw-opcua-aspace-{user}"
    try:
        asyncua_version = version("asyncua")
    except PackageNotFoundError:  # pragma: no cover - asyncua imported from a source tree
        asyncua_version = "src"
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    return base / f"asyncua-{asyncua_version}-py{py}"


async def new_server(*, cache: bool = True) -> Server:
    """An initialised `asyncua.Server` (standard address space loaded), from the shelf if it can."""
    if not cache:
        return await _plain()
    final = aspace_cache_dir()
    shelf = final / _SHELF
    if shelf.is_file():
        server = Server()
        try:
            await server.init(shelf_file=shelf)
            return server
        except Exception:
            log.warning("OPC UA address-space shelf %s unusable: rebuilding", shelf, exc_info=True)
            shutil.rmtree(final, ignore_errors=True)
    return await _build(final)


async def _plain() -> Server:
    server = Server()
    await server.init()
    return server


async def _build(final: Path) -> Server:
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    except OSError as exc:
        log.info("no OPC UA address-space cache (%s): plain server start", exc)
        return await _plain()
    server = Server()
    try:
        await server.init(shelf_file=tmp / _SHELF)  # builds the address space, then the shelf
        (tmp / _SHELF).touch(exist_ok=True)  # the marker asyncua checks (dbm.dumb writes .dat/.dir)
    except Exception:
        log.warning("cannot write the OPC UA address-space shelf in %s", tmp, exc_info=True)
        shutil.rmtree(tmp, ignore_errors=True)
        return await _plain()
    try:
        os.rename(tmp, final)  # atomic: other processes see no shelf or a complete one
    except OSError:  # another process put its shelf there first
        shutil.rmtree(tmp, ignore_errors=True)
    return server
