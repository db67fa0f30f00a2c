"""The FastAPI app of bench/asgi.py, served the same way by fastlane serve, uvicorn and granian.

`async def` endpoints that block (time.sleep, a CPU loop) are the bug under test, left in on
purpose; /slow/async is the control (it awaits). `plain` is a bare ASGI hello world.

Run: uvicorn asgi_app:app --workers 2 (or fastlane serve / granian --interface asgi)
"""

import asyncio
import time

from fastapi import FastAPI

app = FastAPI()


@app.get("/fast")
async def fast():
    return {"message": "hello"}


@app.get("/slow/async")
async def slow_async(secs: float = 2):
    await asyncio.sleep(min(secs, 60))
    return {"slept": secs}


@app.get("/slow/async-blocking")
async def slow_async_blocking(secs: float = 2):
    time.sleep(min(secs, 60))
    return {"slept": secs}


@app.get("/cpu/async-blocking")
async def cpu_async_blocking(ms: int = 1000):
    end = time.perf_counter() + min(ms, 60_000) / 1000
    x = 0
    while time.perf_counter() < end:
        x = (x * 31 + 7) & 0xFFFFFFFF
    return {"x": x}


async def plain(scope, receive, send):
    """ASGI hello world, no framework."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})
