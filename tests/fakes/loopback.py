"""Serving a fake's aiohttp app on 127.0.0.1 at a port the OS picks."""

from __future__ import annotations

import socket

from aiohttp import web


async def serve_on_loopback(runner: web.AppRunner) -> int:
    """Set up `runner` and serve it on a free 127.0.0.1 port; returns the port.
    Binding port 0 ourselves avoids the race of probing for a free port first."""
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        await web.SockSite(runner, sock).start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    return port
