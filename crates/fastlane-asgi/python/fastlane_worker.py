"""fastlane's ASGI worker: one ASGI app on one event loop, fed by the fastlane front.

`fastlane serve main:app` starts this file with the app's own Python. The front (Rust) owns the
sockets, speaks HTTP and hands each request to a worker whose event loop is responsive; this file
is the other end of that hand-off. It runs as two kinds of process:

* the zygote imports the app once, says whether that worked, and then only forks workers when the
  front asks (a fork of a process that has imported the app takes milliseconds; a fresh import of
  FastAPI takes a third of a second);
* each forked worker runs lifespan startup, then serves requests on its own event loop until the
  front tells it to stop.

Frames in both directions: a 9-byte header (payload length u32, type u8, request id u32, little
endian) and a payload. Requests arrive as `marshal` data (decoded in C, the cheapest way to build
the scope's tuples and bytes); responses leave as `marshal` version 2 data the front decodes.

How the front sees a stuck loop without trusting it: the loop adds one to a counter in a shared
file every TICK seconds; the front reads the file. When the counter stops, the front asks this
process's watchdog thread (which blocks on its own socket, costing nothing meanwhile) for the
loop thread's Python stack. A blocking call releases the GIL, and a pure-Python loop hands it over
every few milliseconds, so the answer comes while the loop is still stuck.

Only the standard library is used here: this file runs with whatever Python the app has.
"""

import asyncio
import importlib
import json
import marshal
import mmap
import os
import signal
import socket
import struct
import sys
import threading
import time
import linecache
import sysconfig
import traceback

HEADER = struct.Struct("<IBI")
U32 = struct.Struct("<I")
TICK_COUNTER = struct.Struct("<Q")

# Frame types; the front's `frame.rs` has the same numbers.
HELLO = 1  # process -> front: who is calling (json)
READY = 2  # process -> front: import done (zygote) / lifespan started (worker)
FAILED = 3  # process -> front: import or startup failed (text: what to do)
FORK = 4  # front -> zygote: fork worker number N (the id field)
EXITED = 5  # zygote -> front: a worker exited (json: pid, status)
KILL = 6  # front -> zygote: SIGKILL the worker whose pid is the id field
SLOTS = 7  # worker -> front: u32 requests started since the last SLOTS (so as many more may come)
REQUEST = 10  # front -> worker: a request (marshal)
BODY = 11  # front -> worker: a request body chunk; flags byte + bytes
WANT_BODY = 12  # worker -> front: the app waits for more request body
DISCONNECT = 13  # front -> worker: the client went away
CREDIT = 14  # front -> worker: u32 more response bytes may be sent
START = 15  # worker -> front: status and headers (marshal)
CHUNK = 16  # worker -> front: response body; flags byte + bytes
RESET = 17  # worker -> front: the response cannot be completed (the app failed mid-body)
DONE = 18  # worker -> front: the request's task ended (its background tasks too)
SHUTDOWN = 20  # front -> worker: stop; u32 grace period in milliseconds
BYE = 21  # worker -> front: stopped (json: what was cut)
STACK = 30  # front -> watchdog: the loop thread's stack, please
STACK_REPLY = 31  # watchdog -> front: json

MORE = 1  # flags byte of BODY and CHUNK: more to come

# Frames under these directories are the standard library's or installed packages': a stall report
# points at the app's own frames first.
LIBRARY_DIRS = tuple(
    {p for key in ("stdlib", "platstdlib", "purelib", "platlib") if (p := sysconfig.get_paths().get(key))}
    | {os.path.dirname(os.path.abspath(__file__))}
)

# Response bytes a request may have in flight towards the front before it waits for CREDIT.
WINDOW = 256 * 1024
TICK = 0.002
ASGI = {"version": "3.0", "spec_version": "2.4"}
DISCONNECTED = {"type": "http.disconnect"}


def frame(kind, rid, payload=b""):
    return HEADER.pack(len(payload), kind, rid) + payload


def log(level, message):
    """A line on stderr the front passes through; the app's own logging is untouched."""
    sys.stderr.write(f"fastlane worker {os.getpid()}: {level}: {message}\n")
    sys.stderr.flush()


def recv_exact(sock, n):
    parts = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            return None
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def recv_frame(sock):
    header = recv_exact(sock, HEADER.size)
    if header is None:
        return None
    length, kind, rid = HEADER.unpack(header)
    payload = recv_exact(sock, length) if length else b""
    if payload is None:
        return None
    return kind, rid, payload


class AppError(Exception):
    """The app could not be loaded; the message says what to do."""


def load_app(spec, factory, app_dir):
    """`module:attribute` to an ASGI callable, with uvicorn's rules."""
    sys.path.insert(0, app_dir)
    module_name, _, attrs = spec.partition(":")
    if not module_name or not attrs:
        raise AppError(f'the app "{spec}" must be given as "module:attribute", e.g. main:app')
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name and not module_name.startswith(f"{exc.name}."):
            missing = exc.name
            raise AppError(
                f'importing "{module_name}" failed: its dependency "{missing}" is not installed in '
                f"{sys.executable} (activate the app's virtualenv, or pass --python)\n"
                + "".join(traceback.format_exception(exc))
            ) from None
        raise AppError(
            f'could not import module "{module_name}" from {os.path.abspath(app_dir)} '
            f"(run from the app's directory, or pass --app-dir)"
        ) from None
    except BaseException as exc:  # noqa: BLE001: any failure of the app's import is reported
        raise AppError(
            f'importing "{module_name}" raised {type(exc).__name__}: {exc}\n'
            + "".join(traceback.format_exception(exc))
        ) from None
    app = module
    for attr in attrs.split("."):
        try:
            app = getattr(app, attr)
        except AttributeError:
            raise AppError(f'attribute "{attrs}" not found in module "{module_name}"') from None
    if factory:
        if not callable(app):
            raise AppError(f'"{spec}" is not callable, so it cannot be a --factory')
        try:
            app = app()
        except BaseException as exc:  # noqa: BLE001
            raise AppError(
                f'the factory "{spec}" raised {type(exc).__name__}: {exc}\n'
                + "".join(traceback.format_exception(exc))
            ) from None
    if not callable(app):
        raise AppError(
            f'"{spec}" is a {type(app).__name__}, not an ASGI app (an ASGI app is called as '
            f"app(scope, receive, send); with a function that returns one, pass --factory)"
        )
    if not asyncio.iscoroutinefunction(app) and not asyncio.iscoroutinefunction(getattr(app, "__call__", None)):
        if isinstance(app, type) or _is_asgi2(app):
            raise AppError(f'"{spec}" looks like an ASGI 2 app (a class called with the scope); fastlane runs ASGI 3 apps')
    return app


def _is_asgi2(app):
    """ASGI 2 apps take one argument (the scope) and return a callable."""
    import inspect

    try:
        params = inspect.signature(app).parameters
    except (TypeError, ValueError):
        return False
    return len(params) == 1


# --- the zygote -------------------------------------------------------------------------------


def zygote(config):
    front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    front.connect(config["socket"])
    front.sendall(frame(HELLO, 0, json.dumps({"role": "zygote", "pid": os.getpid()}).encode()))
    # Ctrl-C in a terminal, `timeout`, and systemd's default KillMode signal the whole process group
    # or cgroup: the front decides what a signal means and tells the workers (they stop when it says,
    # or when its socket closes).
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    try:
        app = load_app(config["app"], config["factory"], config["app_dir"])
    except AppError as exc:
        front.sendall(frame(FAILED, 0, str(exc).encode()))
        return 1
    front.sendall(frame(READY, 0))

    def reap(_signum, _frame):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            try:
                front.sendall(frame(EXITED, 0, json.dumps({"pid": pid, "code": code}).encode()))
            except OSError:
                pass  # the front has gone (it is stopping): nobody to tell

    signal.signal(signal.SIGCHLD, reap)
    while True:
        got = recv_frame(front)
        if got is None:
            return 0
        kind, number, _ = got
        if kind == KILL:
            try:
                os.kill(number, signal.SIGKILL)
            except OSError:
                pass
            continue
        if kind != FORK:
            continue
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            front.close()
            code = 1
            try:
                code = worker(app, config, number)
            except BaseException:  # noqa: BLE001: a worker must never return into the zygote's loop
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)


# --- a worker ---------------------------------------------------------------------------------


def new_loop(kind):
    if kind in ("auto", "uvloop"):
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            if kind == "uvloop":
                log("warning", "--loop uvloop was asked for but uvloop is not installed; using asyncio")
    return asyncio.new_event_loop()


def worker(app, config, number):
    front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    front.connect(config["socket"])
    watchdog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    watchdog.connect(config["socket"])
    hello = {"role": "worker", "number": number, "pid": os.getpid()}
    front.sendall(frame(HELLO, number, json.dumps(hello).encode()))
    watchdog.sendall(frame(HELLO, number, json.dumps(dict(hello, role="watchdog")).encode()))

    loop = new_loop(config["loop"])
    asyncio.set_event_loop(loop)
    tick_path = os.path.join(config["dir"], f"tick-{number}")
    with open(tick_path, "w+b") as f:
        f.truncate(mmap.PAGESIZE)
        ticks = mmap.mmap(f.fileno(), mmap.PAGESIZE)
    server = Server(app, config, loop, front, ticks)
    threading.Thread(target=server.watch, args=(watchdog,), name="fastlane-watchdog", daemon=True).start()
    try:
        return loop.run_until_complete(server.run())
    finally:
        loop.close()


class Server:
    """One worker's requests, lifespan and stop."""

    def __init__(self, app, config, loop, sock, ticks):
        self.app = app
        self.config = config
        self.loop = loop
        self.sock = sock
        self.ticks = ticks
        self.count = 0
        self.state = {}
        self.conn = None
        self.loop_thread = threading.get_ident()
        self.stopping = None

    # The tick the front watches: a stuck loop stops counting.
    def tick(self):
        self.count += 1
        TICK_COUNTER.pack_into(self.ticks, 0, self.count)
        self.loop.call_later(TICK, self.tick)

    async def run(self):
        self.tick()
        lifespan = Lifespan(self.app, self.state)
        failure = await lifespan.startup()
        if failure is not None:
            self.sock.sendall(frame(FAILED, 0, failure.encode()))
            return 3
        self.stopping = self.loop.create_future()
        _, self.conn = await self.loop.create_unix_connection(lambda: Connection(self), sock=self.sock)
        self.conn.send(READY, 0)
        grace = await self.stopping
        cut = await self.conn.drain(grace)
        failure = await lifespan.shutdown()
        if failure is not None:
            log("error", failure)
        self.conn.send(BYE, 0, json.dumps({"cut": cut, "shutdown_failed": failure}).encode())
        self.conn.flush()
        await asyncio.sleep(0)
        return 1 if cut or failure else 0

    def watch(self, sock):
        """The watchdog thread: answers the front's questions about the loop thread."""
        while True:
            got = recv_frame(sock)
            if got is None:
                return
            kind, rid, _ = got
            if kind == STACK:
                try:
                    reply = self.describe_loop()
                except Exception as exc:  # noqa: BLE001: never let the watchdog die
                    reply = {"error": f"{type(exc).__name__}: {exc}"}
                sock.sendall(frame(STACK_REPLY, rid, json.dumps(reply).encode()))

    @staticmethod
    def loop_is_waiting(stack):
        """Whether the loop thread sits in the loop's own machinery (waiting for I/O, between callbacks):
        then no code of the app holds it, and a missed tick means the process was not scheduled."""
        if not stack:
            return True
        filename, _, function = stack[0][0], stack[0][1], stack[0][2]
        if filename == __file__ and function == "worker":
            return True  # uvloop runs in C under run_until_complete: no Python frame of a callback
        return os.path.basename(filename) in ("selectors.py", "base_events.py") and function in (
            "select", "_run_once", "run_forever", "run_until_complete"
        )

    def describe_loop(self):
        top = sys._current_frames().get(self.loop_thread)
        stack = []
        while top is not None and len(stack) < 64:
            code = top.f_code
            filename = code.co_filename
            is_app = not filename.startswith(LIBRARY_DIRS) and not filename.startswith("<")
            source = linecache.getline(filename, top.f_lineno).strip()
            stack.append([filename, top.f_lineno, code.co_name, is_app, source])
            top = top.f_back
        reply = {"stack": stack, "idle": self.loop_is_waiting(stack)}
        # Which request's task is on the loop: an unsynchronised read of asyncio's table, under the GIL.
        conn = self.conn
        try:
            task = asyncio.current_task(self.loop)
        except RuntimeError:
            task = None
        if conn is not None and task is not None:
            cycle = conn.by_task.get(task)
            if cycle is not None:
                reply["request"] = cycle.rid
                route = cycle.scope.get("route")
                path = getattr(route, "path", None)
                if isinstance(path, str):
                    reply["route"] = path
                if cycle.complete:
                    reply["after_response"] = True
            else:
                reply["task"] = task.get_name()
        return reply


class Lifespan:
    """ASGI lifespan, as uvicorn's `--lifespan auto`: an app that does not speak it is served anyway."""

    def __init__(self, app, state):
        self.app = app
        self.state = state
        self.inbox = asyncio.Queue()
        self.outbox = asyncio.Queue()
        self.task = None
        self.supported = True

    async def startup(self):
        scope = {"type": "lifespan", "asgi": ASGI, "state": self.state}
        self.task = asyncio.get_running_loop().create_task(self.main(scope))
        return await self.phase("startup")

    async def phase(self, name):
        """Sends `lifespan.<name>` and returns None when it completed, else what went wrong."""
        await self.inbox.put({"type": f"lifespan.{name}"})
        message = await self.outbox.get()
        if message is None:
            return None
        if message["type"] == f"lifespan.{name}.failed":
            text = (message.get("message") or "").strip() or "(no message)"
            lines = text.splitlines()
            if len(lines) > 1:
                # Starlette sends the whole traceback: its last line says what happened.
                return f"the app's lifespan {name} failed: {lines[-1]}\n{text}"
            return f"the app's lifespan {name} failed: {text}"
        if message["type"] == "lifespan.error":
            return message["message"].replace("lifespan raised", f"lifespan {name} raised")
        return None

    async def main(self, scope):
        sent = []

        async def receive():
            return await self.inbox.get()

        async def send(message):
            sent.append(message)
            await self.outbox.put(message)

        try:
            await self.app(scope, receive, send)
        except BaseException as exc:  # noqa: BLE001
            if not sent:
                # Never answered: the app does not do lifespan (a plain ASGI callable).
                self.supported = False
                await self.outbox.put(None)
                return
            trace = "".join(traceback.format_exception(exc))
            await self.outbox.put(
                {"type": "lifespan.error", "message": f"the app's lifespan raised {type(exc).__name__}: {exc}\n{trace}"}
            )

    async def shutdown(self):
        if not self.supported or self.task is None or self.task.done():
            return None
        return await self.phase("shutdown")


class Connection(asyncio.Protocol):
    """The worker's end of its socket to the front: frames in, frames out, one write per loop turn."""

    def __init__(self, server):
        self.server = server
        self.app = server.app
        self.loop = server.loop
        self.cycles = {}
        self.by_task = {}
        self.pending = b""
        self.out = []
        self.flushing = False
        self.started = 0
        self.transport = None
        self.writable = None
        self.idle = None
        root = server.config["root_path"]
        self.root_path = root
        self.root_raw = root.encode("ascii", "replace")

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        # The front is gone: nobody can receive a response any more.
        for cycle in list(self.cycles.values()):
            cycle.disconnect()
        if self.server.stopping is not None and not self.server.stopping.done():
            self.server.stopping.set_result(0)

    def pause_writing(self):
        self.writable = self.loop.create_future()

    def resume_writing(self):
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    def send(self, kind, rid, payload=b""):
        self.out.append(HEADER.pack(len(payload), kind, rid))
        if payload:
            self.out.append(payload)
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self.flush)

    def schedule_flush(self):
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self.flush)

    def flush(self):
        self.flushing = False
        if self.started:
            self.out.append(HEADER.pack(4, SLOTS, 0) + U32.pack(self.started))
            self.started = 0
        if self.out:
            out, self.out = self.out, []
            if not self.transport.is_closing():
                self.transport.write(b"".join(out))

    def data_received(self, data):
        if self.pending:
            data = self.pending + data
        pos, end = 0, len(data)
        unpack = HEADER.unpack_from
        while end - pos >= 9:
            length, kind, rid = unpack(data, pos)
            stop = pos + 9 + length
            if stop > end:
                break
            payload = data[pos + 9 : stop]
            pos = stop
            if kind == REQUEST:
                self.request(rid, payload)
                continue
            cycle = self.cycles.get(rid)
            if kind == BODY:
                if cycle is not None:
                    cycle.body_arrived(payload[1:], payload[0] & MORE)
            elif kind == CREDIT:
                if cycle is not None:
                    cycle.credit_arrived(U32.unpack(payload)[0])
            elif kind == DISCONNECT:
                if cycle is not None:
                    cycle.disconnect()
            elif kind == SHUTDOWN:
                stopping = self.server.stopping
                if stopping is not None and not stopping.done():
                    stopping.set_result(U32.unpack(payload)[0] / 1000)
        self.pending = data[pos:] if pos < end else b""

    def request(self, rid, payload):
        method, path, raw_path, query, headers, client, server, scheme, version, more, body = marshal.loads(payload)
        scope = {
            "type": "http",
            "asgi": ASGI,
            "http_version": version,
            "server": server,
            "client": client,
            "scheme": scheme,
            "method": method,
            "root_path": self.root_path,
            "path": self.root_path + path if self.root_path else path,
            "raw_path": self.root_raw + raw_path if self.root_path else raw_path,
            "query_string": query,
            "headers": headers,
            "state": self.server.state.copy(),
        }
        cycle = Cycle(self, rid, scope, body, more)
        self.cycles[rid] = cycle
        task = self.loop.create_task(cycle.run())
        self.by_task[task] = cycle
        cycle.task = task

    def finished(self, cycle):
        del self.cycles[cycle.rid]
        self.by_task.pop(cycle.task, None)
        self.send(DONE, cycle.rid)
        if not self.cycles and self.idle is not None and not self.idle.done():
            self.idle.set_result(None)

    async def drain(self, grace):
        """Waits for the requests' tasks (their background tasks included) up to `grace` seconds."""
        if self.cycles:
            self.idle = self.loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self.idle), grace)
            except asyncio.TimeoutError:
                pass
        cut = []
        for cycle in list(self.cycles.values()):
            scope = cycle.scope
            route = getattr(scope.get("route"), "path", None)
            what = "a background task of " if cycle.complete else ""
            cut.append(f"{what}{scope['method']} {route if isinstance(route, str) else scope['path']}")
            cycle.task.cancel()
        if cut:
            await asyncio.sleep(0)
        return cut


class Cycle:
    """One request: the app's `receive` and `send`, and the task that runs it."""

    __slots__ = (
        "conn", "rid", "scope", "chunks", "more", "asked", "waiter", "started", "complete",
        "disconnected", "credit", "credit_waiter", "task", "status",
    )

    def __init__(self, conn, rid, scope, body, more):
        self.conn = conn
        self.rid = rid
        self.scope = scope
        self.chunks = [body] if body or not more else []
        self.more = more
        self.asked = False
        self.waiter = None
        self.started = False
        self.complete = False
        self.disconnected = False
        self.credit = WINDOW
        self.credit_waiter = None
        self.task = None
        self.status = 0

    def wake(self):
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def body_arrived(self, data, more):
        self.chunks.append(data)
        self.more = bool(more)
        self.asked = False
        self.wake()

    def credit_arrived(self, n):
        self.credit += n
        waiter = self.credit_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def disconnect(self):
        self.disconnected = True
        self.wake()
        waiter = self.credit_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def receive(self):
        while True:
            if self.chunks:
                body = self.chunks.pop(0)
                more = self.more or bool(self.chunks)
                return {"type": "http.request", "body": body, "more_body": more}
            if self.disconnected or self.complete:
                return DISCONNECTED
            if self.more and not self.asked:
                self.asked = True
                self.conn.send(WANT_BODY, self.rid)
            self.waiter = self.conn.loop.create_future()
            await self.waiter
            self.waiter = None

    async def send(self, message):
        kind = message["type"]
        if kind == "http.response.body":
            if not self.started:
                raise RuntimeError("the app sent 'http.response.body' before 'http.response.start'")
            if self.complete:
                raise RuntimeError("the app sent 'http.response.body' after the response was complete")
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if not more:
                self.complete = True
                self.wake()
            if self.disconnected:
                return
            conn = self.conn
            if body:
                while self.credit <= 0 and not self.disconnected:
                    self.credit_waiter = conn.loop.create_future()
                    await self.credit_waiter
                    self.credit_waiter = None
                if self.disconnected:
                    return
                self.credit -= len(body)
            conn.send(CHUNK, self.rid, (b"\x01" if more else b"\x00") + body)
            if conn.writable is not None:
                await conn.writable
        elif kind == "http.response.start":
            if self.started:
                raise RuntimeError("the app sent 'http.response.start' twice")
            self.started = True
            self.status = message["status"]
            if self.disconnected:
                return
            headers = message.get("headers", ())
            try:
                start = marshal.dumps((self.status, headers), 2)
            except ValueError:
                # An IntEnum status, a header tuple subclass...: plain types marshal can write.
                start = marshal.dumps(plain_start(self.status, headers), 2)
            self.conn.send(START, self.rid, start)
        else:
            raise RuntimeError(f"the app sent {kind!r}, which is not a message of an HTTP request")

    async def run(self):
        conn = self.conn
        conn.started += 1
        conn.schedule_flush()
        try:
            await conn.app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            if not self.complete and not self.disconnected:
                conn.send(RESET, self.rid)
            raise
        except BaseException:  # noqa: BLE001: the worker lives on; the client gets a 500
            log("error", f"exception in the ASGI app, {self.scope['method']} {self.scope['path']}:\n{traceback.format_exc()}")
            if not self.started:
                self.internal_error()
            elif not self.complete:
                conn.send(RESET, self.rid)
        else:
            if not self.started:
                log("error", f"the ASGI app returned without answering {self.scope['method']} {self.scope['path']}")
                self.internal_error()
            elif not self.complete and not self.disconnected:
                log("error", f"the ASGI app returned before finishing its response to {self.scope['method']} {self.scope['path']}")
                conn.send(RESET, self.rid)
        finally:
            self.complete = True
            conn.finished(self)

    def internal_error(self):
        self.started = self.complete = True
        body = b"Internal Server Error"
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21")]
        self.conn.send(START, self.rid, marshal.dumps((500, headers), 2))
        self.conn.send(CHUNK, self.rid, b"\x00" + body)


def plain_start(status, headers):
    """The start message's values as the plain int and bytes the front reads, or a TypeError naming the bad one."""
    if not isinstance(status, int):
        raise TypeError(f"the response status must be an int, not {type(status).__name__}")
    pairs = []
    for pair in headers:
        name, value = pair
        if not isinstance(name, (bytes, bytearray)) or not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"response header {pair!r}: ASGI header names and values are bytes")
        pairs.append((bytes(name), bytes(value)))
    return int(status), pairs


def main():
    config = json.loads(sys.argv[1])
    sys.exit(zygote(config))


if __name__ == "__main__":
    main()
