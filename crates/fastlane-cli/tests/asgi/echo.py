"""An app with no middleware: an echo (the request body streams in while the response streams
out), an endpoint that waits for its client to leave, and `/test2` blocking its loop in the
request's own task, the first step of its run.

(Starlette's BaseHTTPMiddleware, which `app.py` uses, can cut such a body short under any server,
uvicorn loses more of it than fastlane there, and it hides `http.disconnect` from
`request.is_disconnected()` under any server. This app shows the server's own part.)"""

import asyncio
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

app = FastAPI()


@app.post("/echo")
async def echo(request: Request):
    async def back():
        async for chunk in request.stream():
            yield chunk

    return StreamingResponse(back(), media_type="application/octet-stream")


LEFT = []


@app.get("/watch")
async def watch(request: Request, secs: float = 20):
    """Waits for its client to leave (`http.disconnect`), as an endpoint streaming to a browser does."""
    end = time.monotonic() + secs
    while time.monotonic() < end:
        if await request.is_disconnected():
            LEFT.append(f"client left after {secs - (end - time.monotonic()):.1f}s")
            return {"left": True}
        await asyncio.sleep(0.02)
    LEFT.append("client stayed")
    return {"left": False}


@app.get("/left")
async def left():
    return LEFT


CALLS_FILE = os.environ.get("FASTLANE_TEST_CALLS_FILE")


@app.get("/test1")
async def test1():
    if CALLS_FILE:
        # One line per run, from whichever worker ran it: the test counts them.
        with open(CALLS_FILE, "a") as f:
            f.write(f"{os.getpid()}\n")
    return "test1"


@app.get("/test2")
async def test2(secs: float = 8):
    time.sleep(secs)  # blocks the loop in the request's own task (no middleware runs it in another)
    return "test2"
