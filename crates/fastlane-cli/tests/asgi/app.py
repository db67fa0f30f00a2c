"""The FastAPI app of `tests/serve.rs`: one endpoint per feature a FastAPI user relies on, and the
seed articles' blocking mistakes, left in on purpose."""

import asyncio
import os
import tempfile
import time
from contextlib import asynccontextmanager

from fastapi import BackgroundTasks, Depends, FastAPI, File, HTTPException, Request, UploadFile, WebSocket
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel

EVENTS = []


@asynccontextmanager
async def lifespan(app):
    app.state.started_by = "lifespan"
    print(f"lifespan startup in {os.getpid()}", flush=True)
    die_after = os.environ.get("FASTLANE_TEST_DIE_AFTER")
    if die_after:
        # A worker that keeps dying soon after it starts (a bad deploy): the server backs off.
        asyncio.get_running_loop().call_later(float(die_after), os._exit, 3)
    yield {"from_state": "lifespan state"}
    print(f"lifespan shutdown in {os.getpid()}", flush=True)


app = FastAPI(lifespan=lifespan)


class Teapot(Exception):
    pass


@app.exception_handler(Teapot)
async def teapot_handler(request: Request, exc: Teapot):
    return JSONResponse({"handled": "teapot"}, status_code=418)


@app.middleware("http")
async def add_header(request: Request, call_next):
    response = await call_next(request)
    response.headers["x-middleware"] = "ran"
    return response


@app.get("/fast")
async def fast():
    return {"ok": True}


@app.get("/test1")
async def test1():
    return "test1"


@app.get("/test2")
async def test2(secs: float = 8):
    time.sleep(secs)  # the seed article's bug: a blocking call in an async endpoint
    return "test2"


@app.get("/spin")
async def spin(secs: float = 1):
    end = time.monotonic() + secs
    n = 0
    while time.monotonic() < end:
        n += 1
    return {"spins": n}


@app.get("/sleep")
async def sleep(secs: float = 5):
    await asyncio.sleep(secs)
    return {"slept": secs, "pid": os.getpid()}


@app.get("/items/{item_id}")
async def item(item_id: int, q: str | None = None, limit: int = 10):
    return {"item_id": item_id, "q": q, "limit": limit}


class Profile(BaseModel):
    name: str
    age: int


@app.post("/profiles")
async def profiles(profile: Profile):
    return {"name": profile.name, "age": profile.age}


@app.post("/upload")
async def upload(file: UploadFile = File(...)):
    size = 0
    checksum = 0
    while chunk := await file.read(1 << 20):
        size += len(chunk)
        checksum = (checksum + sum(chunk[::4096])) % 1_000_000_007
    return {"filename": file.filename, "size": size, "sample_sum": checksum}


@app.get("/stream")
async def stream(n: int = 3, delay: float = 0.2):
    async def chunks():
        for i in range(n):
            yield f"chunk {i}\n"
            await asyncio.sleep(delay)

    return StreamingResponse(chunks(), media_type="text/plain")


FILE = os.path.join(tempfile.gettempdir(), f"fastlane-test-file-{os.getppid()}.txt")


@app.get("/file")
async def file():
    with open(FILE, "w") as f:
        f.write("file contents\n" * 1000)
    return FileResponse(FILE, filename="data.txt")


def sync_task(tag: str):
    time.sleep(0.2)
    print(f"sync background task {tag} done", flush=True)


async def async_task(tag: str):
    await asyncio.sleep(0.2)
    print(f"async background task {tag} done", flush=True)


async def blocking_async_task(secs: float):
    time.sleep(secs)  # the seed article's background-task bug
    print(f"blocking background task done after {secs} s in process {os.getpid()}", flush=True)


@app.post("/background")
async def background(tasks: BackgroundTasks, tag: str = "x", block: float = 0):
    tasks.add_task(sync_task, tag)
    tasks.add_task(async_task, tag)
    if block:
        tasks.add_task(blocking_async_task, block)
    return {"scheduled": tag, "pid": os.getpid()}


@app.get("/teapot")
async def teapot():
    raise Teapot()


@app.get("/missing")
async def missing():
    raise HTTPException(status_code=404, detail="no such thing")


@app.get("/boom")
async def boom():
    raise RuntimeError("boom, on purpose")


async def resource():
    EVENTS.append("opened")
    try:
        yield "the resource"
    finally:
        EVENTS.append("closed")


@app.get("/dependency")
async def dependency(value: str = Depends(resource)):
    return {"value": value, "events_before": list(EVENTS), "pid": os.getpid()}


@app.get("/events")
async def events():
    return {"events": EVENTS, "pid": os.getpid()}


@app.get("/state")
async def state(request: Request):
    return {"app_state": request.app.state.started_by, "lifespan_state": request.state.from_state}


@app.get("/scope")
async def scope(request: Request):
    s = request.scope
    return {
        "type": s["type"],
        "asgi": s["asgi"]["version"],
        "http_version": s["http_version"],
        "method": s["method"],
        "scheme": s["scheme"],
        "path": s["path"],
        "raw_path": s["raw_path"].decode("latin-1"),
        "query_string": s["query_string"].decode("latin-1"),
        "root_path": s["root_path"],
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in s["headers"]],
        "client_host": s["client"][0],
        "server": list(s["server"]),
    }


@app.get("/crash")
async def crash():
    os._exit(7)


@app.get("/lazy")
async def lazy():
    import lazy_heavy  # imported at first use, on the loop: a stall the report says how to fix

    return {"loaded": lazy_heavy.LOADED}


@app.get("/pid")
async def pid():
    return {"pid": os.getpid()}


def create_app():
    """For `--factory`: the same app, from a function."""
    return app


@app.websocket("/ws")
async def websocket_echo(websocket: WebSocket):
    protocols = websocket.scope["subprotocols"]
    await websocket.accept(subprotocol=protocols[0] if protocols else None)
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            print(f"websocket closed by the client with code {message['code']}", flush=True)
            return
        if message.get("text") is not None:
            if message["text"] == "close":
                await websocket.close(code=4001, reason="asked to")
                return
            await websocket.send_text("echo: " + message["text"])
        else:
            await websocket.send_bytes(message["bytes"][::-1])


@app.websocket("/ws-deny")
async def websocket_deny(websocket: WebSocket):
    await websocket.close()
