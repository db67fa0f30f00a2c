"""The demo's routes on FastAPI + uvicorn, written as FastAPI's docs suggest:
`def` endpoints for blocking work, a process pool for CPU work, BackgroundTasks.
The seeds' bug (time.sleep inside `async def`) is left in, as in the demo.

Run: uvicorn fastapi_app:app --port PORT
"""

import asyncio
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Optional

from fastapi import BackgroundTasks, FastAPI
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel

app = FastAPI()
_pool: Optional[ProcessPoolExecutor] = None


def pool() -> ProcessPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ProcessPoolExecutor()
    return _pool


def clamp_secs(value: Optional[float], default: float) -> float:
    return min(max(value if value is not None else default, 0.0), 60.0)


def burn(ms: int) -> int:
    end = time.perf_counter() + ms / 1000.0
    x = 0
    while time.perf_counter() < end:
        for _ in range(1000):
            x = (x * 31 + 7) & 0xFFFFFFFF
    return x


@app.get("/fast", response_class=PlainTextResponse)
async def fast():
    return "ok"


@app.get("/test1", response_class=PlainTextResponse)
async def test1():
    return "test1"


@app.get("/test2", response_class=PlainTextResponse)
async def test2(secs: Optional[float] = None):
    time.sleep(clamp_secs(secs, 8.0))
    return "test2"


@app.get("/ping", response_class=PlainTextResponse)
async def ping(secs: Optional[float] = None):
    print("Hello")
    time.sleep(clamp_secs(secs, 5.0))
    print("bye")
    return "pong"


@app.get("/slow/async-blocking", response_class=PlainTextResponse)
async def slow_async_blocking(secs: Optional[float] = None):
    time.sleep(clamp_secs(secs, 1.0))
    return "slept"


@app.get("/slow/sync", response_class=PlainTextResponse)
def slow_sync(secs: Optional[float] = None):
    time.sleep(clamp_secs(secs, 1.0))
    return "slept"


@app.get("/slow/async", response_class=PlainTextResponse)
async def slow_async(secs: Optional[float] = None):
    await asyncio.sleep(clamp_secs(secs, 1.0))
    return "waited"


@app.get("/cpu/async-blocking", response_class=PlainTextResponse)
async def cpu_async_blocking(ms: int = 100):
    burn(min(ms, 60000))
    return "computed"


@app.get("/cpu/offload", response_class=PlainTextResponse)
async def cpu_offload(ms: int = 100):
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(pool(), burn, min(ms, 60000))
    return "computed"


@app.get("/stream/blocking")
async def stream_blocking(chunks: int = 3, secs: Optional[float] = None):
    delay = clamp_secs(secs, 1.0)

    def produce():
        for i in range(min(chunks, 1000)):
            time.sleep(delay)
            yield f"chunk {i}\n"

    return StreamingResponse(produce(), media_type="text/plain")


class Profile(BaseModel):
    name: str
    work_ms: int = 2000


@app.post("/profile")
async def profile(p: Profile, background: BackgroundTasks):
    background.add_task(burn, min(p.work_ms, 60000))
    return {}


@app.get("/", response_class=PlainTextResponse)
async def action(background: BackgroundTasks, action: Optional[int] = None, secs: Optional[float] = None):
    delay = clamp_secs(secs, 15.0)

    async def async_blocking():
        time.sleep(delay)

    async def async_sleeping():
        await asyncio.sleep(delay)

    if action == 1:
        background.add_task(time.sleep, delay)
    elif action == 2:
        background.add_task(async_blocking)
    elif action == 3:
        background.add_task(async_sleeping)
    return "scheduled"
