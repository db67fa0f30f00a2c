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
file every TICK seconds; the front reads the file. Requests a stuck loop has not started are taken
back by the front and served elsewhere: each request's task, before it runs the app, claims its id
under the file's lock (flock), unless the front has revoked it there first; the lock makes the two
decisions exclusive, so a request runs once, here or elsewhere. When the counter stops, the front asks this
process's watchdog thread (which blocks on its own socket, costing nothing meanwhile) for the
loop thread's Python stack. A blocking call releases the GIL, and a pure-Python loop hands it over
every few milliseconds, so the answer comes while the loop is still stuck.

Only the standard library is used here: this file runs with whatever Python the app has.
"""

import asyncio
import fcntl
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
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
U64_PAIR = struct.Struct("<QQ")

# The shared file of a worker (the front reads and writes it too), little endian u64s:
TICKS_AT = 0  # the loop's tick counter
STARTED_AT = 8  # the id of the last request whose task started (written under the file's lock)
REVOKED_AT = 16  # a range of ids, first and last, the front took back (written under the lock)

# Frame types; the front's `frame.rs` has the same numbers.
HELLO = 1  # process -> front: who is calling (json)
READY = 2  # process -> front: import done (zygote) / lifespan started (worker)
FAILED = 3  # process -> front: import or startup failed (text: what to do)
FORK = 4  # front -> zygote: fork worker number N (the id field)
EXITED = 5  # zygote -> front: a worker exited (json: pid, status)
KILL = 6  # front -> zygote: SIGKILL the worker whose pid is the id field
SLOTS = 7  # worker -> front: u32 requests started since the last SLOTS (so as many more may come)
NICE = 8  # front -> zygote: set the nice value (i32 payload) of the worker whose pid is the id field
NICED = 9  # zygote -> front: whether it could (one byte), for the pid in the id field
IDLE_CLASS = 20  # the NICE value that asks for the idle scheduling class (SCHED_IDLE)
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
WS_CONNECT = 40  # front -> worker: a WebSocket handshake (the REQUEST payload)
WS_ACCEPT = 41  # worker -> front: the app accepted (marshal: subprotocol or None, headers)
WS_CLOSE = 42  # worker -> front: u16 code + reason; before the accept, the handshake is denied (403)
WS_TEXT = 43  # both ways: a text message (utf-8)
WS_BYTES = 44  # both ways: a binary message
WS_GONE = 45  # front -> worker: the client closed the connection or went away (u16 code)
WS_TAKEN = 46  # worker -> front: u32 more messages the app has taken (the front reads as many more)
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
# After a late tick, claims take the lock this long (see `Connection.claim`).
CAREFUL_FOR = 0.05
ASGI = {"version": "3.0", "spec_version": "2.4"}
DISCONNECTED = {"type": "http.disconnect"}


def frame(kind, rid, payload=b""):
    return HEADER.pack(len(payload), kind, rid) + payload


def log(level, message):
    """A line on stderr the front passes through; the app's own logging is untouched."""
    sys.stderr.write(f"fastlane worker {os.getpid()}: {level}: {message}\n")
    sys.stderr.flush()


def demote(pid, nice):
    """Runs the worker `pid` (its loop thread) at a lower priority while its loop spins the CPU (`nice` > 0),
    or at its normal one again (0). Whether it could.

    IDLE_CLASS, asked for a spinning loop, is the idle scheduling class (SCHED_IDLE) at nice 19: the
    lowest weight there is, and a thread that wakes up on its core (the front, another worker) preempts it
    at once, where a nice value only lowers its share (docs/DESIGN.md has the figures). Going back needs a
    privilege a service seldom has: the front then replaces the worker instead."""
    idle = getattr(os, "SCHED_IDLE", None)
    try:
        if idle is not None:
            policy = idle if nice >= IDLE_CLASS else os.SCHED_OTHER
            os.sched_setscheduler(pid, policy, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, pid, min(nice, 19))
        return True
    except OSError:
        return False


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


# Modules that libraries the app uses import at their first use, which is a request's: on the
# loop, reading files from disk while every request of the worker waits (the first request of
# each worker was a 30-60 ms stall). Each is imported here, once, before the workers fork, and
# only if the library that would import it later has been imported by the app.
LAZY_MODULES = (
    ("anyio", "anyio._backends._asyncio"),  # Starlette's thread pool, task groups, streams
)


def preload_lazy_modules():
    for library, module in LAZY_MODULES:
        if library in sys.modules:
            try:
                importlib.import_module(module)
            except Exception:  # noqa: BLE001: a warm-up only; the app imports it itself if it can
                pass


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
    preload_lazy_modules()
    front.sendall(frame(READY, 0))

    def tell(data):
        # The reaper below runs between bytecodes, possibly in the middle of a send: keep it out.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            front.sendall(data)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})

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
        kind, number, payload = got
        if kind == KILL:
            try:
                os.kill(number, signal.SIGKILL)
            except OSError:
                pass
            continue
        if kind == NICE:
            tell(frame(NICED, number, b"\x01" if demote(number, struct.unpack("<i", payload)[0]) else b"\x00"))
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
    shared = open(tick_path, "w+b")  # noqa: SIM115: open for the worker's life
    shared.truncate(mmap.PAGESIZE)
    ticks = mmap.mmap(shared.fileno(), mmap.PAGESIZE)
    server = Server(app, config, loop, front, ticks, shared.fileno())
    loop.set_task_factory(server.task_factory)
    threading.Thread(target=server.watch, args=(watchdog,), name="fastlane-watchdog", daemon=True).start()
    try:
        return loop.run_until_complete(server.run())
    finally:
        loop.close()


class Server:
    """One worker's requests, lifespan and stop."""

    def __init__(self, app, config, loop, sock, ticks, lock_fd):
        self.app = app
        self.lock_fd = lock_fd
        self.config = config
        self.loop = loop
        self.sock = sock
        self.ticks = ticks
        self.count = 0
        self.last_tick = self.tick_due = time.monotonic()
        self.careful_until = self.last_tick + CAREFUL_FOR
        # A tick later than this was held up; a claim within `fresh` of a tick that was not may skip the lock.
        threshold = config["stall_threshold_ms"] / 1000
        self.late = min(0.003, threshold / 3)
        self.fresh = threshold / 3
        self.state = {}
        self.conn = None
        self.loop_thread = threading.get_ident()
        self.stopping = None

    # The tick the front watches: a stuck loop stops counting.
    def beat(self):
        """Counts a tick without re-arming the timer: the loop got back to run our code (a request's
        response going out). A loop busy with a burst of short requests runs one long iteration in which
        the timer's tick comes late; these say it is not stuck, so the front takes nothing back and starts
        no spare. Never moves `last_tick`, which lets claims skip the lock: only a tick under the lock
        (or the timer's) may (see `Connection.claim`)."""
        self.count += 1
        U64.pack_into(self.ticks, TICKS_AT, self.count)

    def tick(self):
        now = time.monotonic()
        if now - self.tick_due > self.late:
            # The loop was held up: the front may be taking requests back.
            # Claims take the lock for a while (see `Connection.claim`).
            self.careful_until = now + CAREFUL_FOR
        self.count += 1
        U64.pack_into(self.ticks, TICKS_AT, self.count)
        self.last_tick = now
        self.tick_due = now + TICK
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
        """Whether the loop thread sits in the loop's own machinery (waiting for I/O, between callbacks)
        or in this server's code (reading frames, claiming a request, writing responses): then no code
        of the app holds it, and the missed tick was a busy machine's or a burst's, gone by the time
        this thread got the GIL. A blocking call of the app releases the GIL inside the call, and a
        spinning one hands it over every 5 ms, so either is caught in the act."""
        if not stack:
            return True
        filename, _, function = stack[0][0], stack[0][1], stack[0][2]
        if filename == __file__:
            return True  # uvloop runs in C under run_until_complete: this file's frame is the loop's
        return os.path.basename(filename) in ("selectors.py", "base_events.py") and function in (
            "select", "_run_once", "run_forever", "run_until_complete"
        )

    def task_factory(self, loop, coro, **kwargs):
        """Makes the loop's tasks: one started from a request's task (an anyio task group's, as
        Starlette's http middleware runs the endpoint in; a streaming body's; one the endpoint made)
        carries that request, so that a stall inside it is blamed on the request."""
        parent = asyncio.current_task(loop)
        if parent is not None:
            conn = self.conn
            cycle = conn.by_task.get(parent) if conn is not None else None
            if cycle is None:
                cycle = getattr(parent, "cycle", None)
            if cycle is not None:
                task = RequestChildTask(coro, loop=loop, **kwargs)
                task.cycle = cycle
                return task
        return asyncio.Task(coro, loop=loop, **kwargs)

    def describe_loop(self):
        top = sys._current_frames().get(self.loop_thread)
        stack = []
        importing = None
        while top is not None and len(stack) < 64:
            code = top.f_code
            filename = code.co_filename
            is_app = not filename.startswith(LIBRARY_DIRS) and not filename.startswith("<")
            source = linecache.getline(filename, top.f_lineno).strip()
            stack.append([filename, top.f_lineno, code.co_name, is_app, source])
            if code.co_name == "_find_and_load" and filename.startswith("<frozen importlib"):
                # The outermost import wins: the module the code asked for, not one it imports in turn.
                name = top.f_locals.get("name")
                importing = name if isinstance(name, str) else importing
            top = top.f_back
        reply = {"stack": stack, "idle": self.loop_is_waiting(stack)}
        if importing is not None:
            reply["importing"] = importing
        # Which request's task is on the loop: an unsynchronised read of asyncio's table, under the GIL.
        conn = self.conn
        try:
            task = asyncio.current_task(self.loop)
        except RuntimeError:
            task = None
        if conn is not None and task is not None:
            cycle = conn.by_task.get(task)
            if cycle is None:
                cycle = getattr(task, "cycle", None)
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


class RequestChildTask(asyncio.Task):
    """A task started by a request's task; `cycle` is that request (see `Server.task_factory`)."""

    __slots__ = ("cycle",)


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
        self.lazy_pending = False
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
        self.server.beat()
        self.out.append(HEADER.pack(len(payload), kind, rid))
        if payload:
            self.out.append(payload)
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self.flush)

    def send_lazily(self, kind, rid, payload=b""):
        """A frame that can wait for the next write (or a millisecond): a request's end, the count of
        requests started. Under load it rides with a response; idle, it costs one write per ms."""
        self.out.append(HEADER.pack(len(payload), kind, rid))
        if payload:
            self.out.append(payload)
        self.schedule_lazily()

    def schedule_lazily(self):
        # One timer at most: a write before it fires takes the frames along, and it finds nothing.
        if not self.lazy_pending:
            self.lazy_pending = True
            self.loop.call_later(0.001, self.lazy_flush)

    def lazy_flush(self):
        self.lazy_pending = False
        self.flush()

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
            if kind == WS_CONNECT:
                self.websocket(rid, payload)
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
            elif kind == WS_TEXT or kind == WS_BYTES:
                if cycle is not None:
                    cycle.arrived(payload.decode() if kind == WS_TEXT else payload, kind == WS_TEXT)
            elif kind == WS_GONE:
                if cycle is not None:
                    cycle.gone(U16.unpack(payload)[0])
            elif kind == SHUTDOWN:
                stopping = self.server.stopping
                if stopping is not None and not stopping.done():
                    stopping.set_result(U32.unpack(payload)[0] / 1000)
                # As uvicorn does: WebSockets do not hold a shutdown; their apps see a disconnect (1012).
                for cycle in list(self.cycles.values()):
                    if isinstance(cycle, WebSocketCycle):
                        cycle.shut_down()
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

    def websocket(self, rid, payload):
        method, path, raw_path, query, headers, client, server, scheme, version, _, _ = marshal.loads(payload)
        protocols = []
        for name, value in headers:
            if name == b"sec-websocket-protocol":
                protocols += [p.strip() for p in value.decode("latin-1").split(",") if p.strip()]
        scope = {
            "type": "websocket",
            "asgi": ASGI,
            "http_version": version,
            "server": server,
            "client": client,
            "scheme": scheme,
            "root_path": self.root_path,
            "path": self.root_path + path if self.root_path else path,
            "raw_path": self.root_raw + raw_path if self.root_path else raw_path,
            "query_string": query,
            "headers": headers,
            "subprotocols": protocols,
            "state": self.server.state.copy(),
        }
        cycle = WebSocketCycle(self, rid, scope)
        self.cycles[rid] = cycle
        task = self.loop.create_task(cycle.run())
        self.by_task[task] = cycle
        cycle.task = task

    def claim(self, rid):
        """Whether request `rid` may start here: not if the front took it back while it waited.

        The front takes requests back only from a loop that has not ticked for the stall threshold, and
        only after checking, under the file's lock, that it still has not. So while the loop has been
        ticking on time (the last tick within a third of the threshold, none late for CAREFUL_FOR), the
        front cannot be taking anything back: the claim is a plain write, no system call. Otherwise it
        takes the lock, and the front's decision and this one exclude each other.
        """
        server = self.server
        now = time.monotonic()
        if now - server.last_tick < server.fresh and now >= server.careful_until:
            U64.pack_into(server.ticks, STARTED_AT, rid)
            return True
        fcntl.flock(server.lock_fd, fcntl.LOCK_EX)
        try:
            first, last = U64_PAIR.unpack_from(server.ticks, REVOKED_AT)
            if first <= rid <= last:
                return False
            U64.pack_into(server.ticks, STARTED_AT, rid)
            # The loop is back, starting a request: a tick, under the lock so that the front (which takes
            # requests back only while the tick has not moved, and re-reads it under the lock) sees it.
            # The claims that follow in this busy iteration may then skip the lock again.
            server.beat()
            server.last_tick = now
            return True
        finally:
            fcntl.flock(server.lock_fd, fcntl.LOCK_UN)

    def revoked(self, cycle):
        """Forgets a request the front took back (it runs on another worker)."""
        del self.cycles[cycle.rid]
        self.by_task.pop(cycle.task, None)
        if not self.cycles and self.idle is not None and not self.idle.done():
            self.idle.set_result(None)

    def finished(self, cycle):
        del self.cycles[cycle.rid]
        self.by_task.pop(cycle.task, None)
        self.send_lazily(DONE, cycle.rid)
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
            method = scope.get("method", "WEBSOCKET")
            cut.append(f"{what}{method} {route if isinstance(route, str) else scope['path']}")
            cycle.task.cancel()
        if cut:
            await asyncio.sleep(0)
        return cut


class Exchange:
    """What a request and a WebSocket share: the claim before the app runs, and the byte credit the
    front grants for what goes back to it."""

    __slots__ = ()

    def begin(self):
        """Claims this request for this worker; False if the front took it back (see `Connection.claim`)."""
        conn = self.conn
        if not conn.claim(self.rid):
            conn.revoked(self)
            return False
        conn.started += 1
        conn.schedule_lazily()
        return True

    def credit_arrived(self, n):
        self.credit += n
        waiter = self.credit_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def run(self):
        """Runs the app for this request; the subclass says what a failure or an early return means."""
        conn = self.conn
        if not self.begin():
            return
        try:
            await conn.app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            self.cancelled()
            raise
        except BaseException:  # noqa: BLE001: the worker lives on
            log("error", f"exception in the ASGI app, {self.describe()}:\n{traceback.format_exc()}")
            self.failed()
        else:
            self.returned()
        finally:
            self.complete = True
            conn.finished(self)

    async def spend_credit(self, n):
        """Waits until the front may take `n` more bytes; False if the client went away meanwhile."""
        while self.credit <= 0 and not self.cut_off():
            self.credit_waiter = self.conn.loop.create_future()
            await self.credit_waiter
            self.credit_waiter = None
        if self.cut_off():
            return False
        self.credit -= n
        return True


class Cycle(Exchange):
    """One request: the app's `receive` and `send`, and the task that runs it."""

    __slots__ = (
        "conn", "rid", "scope", "chunks", "more", "asked", "waiter", "started", "complete",
        "disconnected", "credit", "credit_waiter", "task", "status",
    )

    def cut_off(self):
        """Nothing more can reach the client."""
        return self.disconnected

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
                if not await self.spend_credit(len(body)):
                    return
            conn.send(CHUNK, self.rid, (b"\x01" if more else b"\x00") + body)
            if not more:
                # Written now, not at the end of this loop turn: a task that
                # blocks later in the same turn must not hold a finished response.
                conn.flush()
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

    def describe(self):
        return f"{self.scope['method']} {self.scope['path']}"

    def cancelled(self):
        if not self.complete and not self.disconnected:
            self.conn.send(RESET, self.rid)

    def failed(self):
        # The client gets a 500, or a cut response if it had begun.
        if not self.started:
            self.internal_error()
        elif not self.complete:
            self.conn.send(RESET, self.rid)

    def returned(self):
        if not self.started:
            log("error", f"the ASGI app returned without answering {self.describe()}")
            self.internal_error()
        elif not self.complete and not self.disconnected:
            log("error", f"the ASGI app returned before finishing its response to {self.describe()}")
            self.conn.send(RESET, self.rid)

    def internal_error(self):
        self.started = self.complete = True
        send_internal_error(self.conn, self.rid)


def send_internal_error(conn, rid):
    """A plain 500, for an app that failed before it answered."""
    body = b"Internal Server Error"
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21")]
    conn.send(START, rid, marshal.dumps((500, headers), 2))
    conn.send(CHUNK, rid, b"\x00" + body)
    conn.flush()


class ClientDisconnected(OSError):
    """Sent on a WebSocket the client has closed (uvicorn raises the same)."""


class WebSocketCycle(Exchange):
    """One WebSocket connection: the app's `receive` and `send`, and the task that runs it."""

    def cut_off(self):
        """Nothing more can reach the client."""
        return self.closed

    def __init__(self, conn, rid, scope):
        self.conn = conn
        self.rid = rid
        self.scope = scope
        self.inbox = [{"type": "websocket.connect"}]
        self.waiter = None
        self.accepted = False
        # The app closed it (or denied it), or the client went away: nothing more goes out.
        self.closed = False
        self.complete = False
        self.credit = WINDOW
        self.credit_waiter = None
        self.task = None

    def wake(self):
        for waiter in (self.waiter, self.credit_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def arrived(self, data, text):
        self.inbox.append({"type": "websocket.receive", "text": data} if text else {"type": "websocket.receive", "bytes": data})
        self.wake()

    def gone(self, code):
        if not self.closed:
            self.inbox.append({"type": "websocket.disconnect", "code": code})
        self.closed = True
        self.wake()

    def disconnect(self):
        self.gone(1006)

    def shut_down(self):
        if self.accepted and not self.closed:
            self.conn.send(WS_CLOSE, self.rid, U16.pack(1012) + b"server shutting down")
            self.conn.flush()
        self.gone(1012)

    async def receive(self):
        while not self.inbox:
            if self.closed:
                return {"type": "websocket.disconnect", "code": 1006}
            self.waiter = self.conn.loop.create_future()
            await self.waiter
            self.waiter = None
        message = self.inbox.pop(0)
        if message["type"] == "websocket.receive":
            self.conn.send_lazily(WS_TAKEN, self.rid, U32.pack(1))
        return message

    async def send(self, message):
        kind = message["type"]
        conn = self.conn
        if kind == "websocket.send":
            if not self.accepted:
                raise RuntimeError("the app sent 'websocket.send' before 'websocket.accept'")
            if self.closed:
                raise ClientDisconnected("the WebSocket is closed")
            data = message.get("bytes")
            if data is not None:
                frame_kind = WS_BYTES
            else:
                data = message.get("text")
                if data is None:
                    raise RuntimeError("'websocket.send' needs 'text' or 'bytes'")
                data = data.encode()
                frame_kind = WS_TEXT
            if not await self.spend_credit(len(data)):
                raise ClientDisconnected("the WebSocket is closed")
            conn.send(frame_kind, self.rid, data)
            conn.flush()
        elif kind == "websocket.accept":
            if self.accepted or self.closed:
                raise RuntimeError("the app sent 'websocket.accept' twice, or after closing")
            self.accepted = True
            headers = message.get("headers") or []
            protocol = message.get("subprotocol")
            try:
                accept = marshal.dumps((protocol, headers), 2)
            except ValueError:
                accept = marshal.dumps((protocol, plain_start(200, headers)[1]), 2)
            conn.send(WS_ACCEPT, self.rid, accept)
            conn.flush()
        elif kind == "websocket.close":
            if self.closed:
                return
            self.closed = True
            code = message.get("code") or 1000
            reason = (message.get("reason") or "").encode()[:123]
            conn.send(WS_CLOSE, self.rid, U16.pack(code) + reason)
            conn.flush()
        else:
            raise RuntimeError(f"the app sent {kind!r}, which is not a message of a WebSocket")

    def describe(self):
        return f"WebSocket {self.scope['path']}"

    def close_with(self, code, reason=b""):
        if not self.closed:
            self.closed = True
            self.conn.send(WS_CLOSE, self.rid, U16.pack(code) + reason)
            self.conn.flush()

    def cancelled(self):
        if self.accepted:
            self.close_with(1012, b"server shutting down")

    def failed(self):
        if not self.accepted and not self.closed:
            # Before the handshake is answered: an HTTP 500, as uvicorn answers.
            self.closed = True
            send_internal_error(self.conn, self.rid)
        else:
            self.close_with(1011)

    def returned(self):
        # Returned without closing: closed normally (or, before an accept, denied).
        self.close_with(1000)


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
