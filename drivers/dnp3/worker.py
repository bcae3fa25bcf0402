"""The DNP3 master child process: `python -m drivers.dnp3.worker --backend dnp3py|pydnp3`.

Runs one backend (drivers.dnp3.protocol.BACKENDS) and answers the driver's requests on
stdin/stdout, one JSON line each (protocol in drivers.dnp3.protocol). It lives in its own process
so that a native crash of a backend (pydnp3 wraps C++ opendnp3) cannot take the gateway down:
the driver sees EOF, marks the device unavailable and starts a new child.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from typing import Any, BinaryIO

from drivers.dnp3.protocol import BACKENDS, Backend, BackendError, decode, encode

__all__ = ["main", "serve"]


async def _handle(backend: Backend, req: dict[str, Any]) -> dict[str, Any]:
    op = req.get("op")
    if op == "open":
        await backend.open(req)
        return {"pid": os.getpid()}
    if op == "poll":
        return await backend.poll(req.get("classes", "integrity") == "integrity")
    if op == "operate":
        analog = [(int(i), int(v)) for i, v in req.get("analog", [])]
        crob = [(int(i), str(c) == "latch_on") for i, c in req.get("crob", [])]
        return {"status": await backend.operate(req.get("mode") == "sbo", analog, crob)}
    if op == "close":
        await backend.close()
        return {}
    raise BackendError(f"unknown op {op!r}")


async def serve(backend: Backend, out: BinaryIO | None = None) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    if out is None:
        out = sys.stdout.buffer
    while True:
        line = await reader.readline()
        if not line:
            break
        rid: Any = None
        try:
            req = decode(line)
            rid = req.get("id")
            answer = await _handle(backend, req)
            answer.update(id=rid, ok=True)
        except BackendError as exc:
            answer = {"id": rid, "ok": False, "error": str(exc), "link": exc.link}
        except Exception as exc:  # a bug or a bad request: answer it, keep serving
            answer = {"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        out.write(encode(answer))
        out.flush()
    await backend.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="drivers.dnp3.worker")
    ap.add_argument("--backend", choices=sorted(BACKENDS), default="dnp3py")
    args = ap.parse_args(argv)
    # The answers go to a private copy of stdout; fd 1 becomes stderr, so that anything a native
    # library prints (opendnp3's console logger writes to std::cout) cannot corrupt the protocol.
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    module = importlib.import_module(BACKENDS[args.backend])
    backend: Backend = module.make_backend()
    asyncio.run(serve(backend, out))
    out.flush()
    # Skip interpreter teardown: pydnp3 was seen to double-free at exit after Shutdown().
    os._exit(0)


if __name__ == "__main__":
    main()
