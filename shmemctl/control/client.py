"""A control-socket client: what the CLI, the console, the metrics endpoint and the
tests use to talk to a daemon.

The wire is QMP, spoken by QEMU's own client of it (`qemu.qmp.QMPClient`). That
client is asynchronous; ours are threads (a CLI command, a console's worker, a
test), so each ControlClient runs one on a private event loop in a thread of its
own and waits on it. The negotiation is ours, not the library's: its own turns a
refusal into an assertion and loses the server's words (a uid that may not use
the socket), which the caller should read.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any, TypeVar

from qemu.qmp import ConnectError, EventListener, ExecInterruptedError, ExecuteError, QMPClient
from qemu.qmp.protocol import Runstate

from ..events import EventRecord
from .protocol import MAX_ANSWER, ControlError, DaemonUnreachable

T = TypeVar("T")

#: qemu.qmp logs every lost connection as an error; the caller gets it as an exception
#: with our words instead (DaemonUnreachable), so its log stays out of the user's way.
_LIBRARY_LOG = logging.getLogger("shmemctl.control.qmp")
_LIBRARY_LOG.propagate = False
_LIBRARY_LOG.addHandler(logging.NullHandler())


class ControlClient:
    """One QMP connection to a daemon's control socket, negotiated and ready.

    `execute` runs a command and returns its `return` value, or raises ControlError
    with the daemon's error class and words; DaemonUnreachable when the daemon is not
    there, goes away or does not answer within `timeout` seconds (None: wait)."""

    def __init__(self, path: str, timeout: float | None = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="control-client"
        )
        self._thread.start()
        self._qmp = QMPClient(readbuflen=MAX_ANSWER)
        self._qmp.logger = _LIBRARY_LOG
        self._qmp.negotiate = False
        self._listener: EventListener | None = None
        #: an event taken off the listener by a wait that was then cancelled (loop thread)
        self._held: EventRecord | None = None
        #: work handed to the loop and not done yet, failed by `close`
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._run(self._qmp.connect(path), timeout)
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def _submit(self, work: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Hand `work` to the loop, unless the client is closed (then DaemonUnreachable:
        a closed loop would never run it)."""
        with self._lock:
            if self._closed:
                work.close()
                raise DaemonUnreachable(f"the client of {self.path} is closed")
            future = asyncio.run_coroutine_threadsafe(work, self._loop)
            self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return future

    def _run(self, work: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Run `work` on this client's loop and wait for it, in our words if it fails."""
        future = self._submit(work)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise DaemonUnreachable(f"the daemon on {self.path} stopped answering") from None
        except ConnectError as exc:
            cause = exc.exc
            if isinstance(cause, PermissionError):
                raise ControlError(
                    f"no permission to open {self.path}; run as the daemon's user or root"
                ) from None
            why = cause.strerror if isinstance(cause, OSError) else str(cause)
            raise DaemonUnreachable(f"no daemon answers on {self.path} ({why})") from None
        except ExecuteError as exc:
            raise ControlError(exc.error.error.desc, exc.error_class) from None
        except (ExecInterruptedError, EOFError, ConnectionError, concurrent.futures.CancelledError):
            raise DaemonUnreachable(f"the daemon on {self.path} closed the connection") from None
        except OSError as exc:
            raise DaemonUnreachable(f"lost the daemon on {self.path} ({exc})") from None

    def execute(self, name: str, /, **arguments: Any) -> Any:
        """Run a command; its `return` value, or ControlError with the daemon's reason."""
        if self._qmp.runstate is not Runstate.RUNNING:
            raise DaemonUnreachable(f"the daemon on {self.path} closed the connection")
        return self._run(self._qmp.execute(name, arguments or None), self.timeout)

    def subscribe(self, events: Iterable[str] | None = None) -> None:
        """Receive these events (shmemctl.events.Event, or their names) from here on; all
        but the trace if None. A name the daemon does not know is refused (ControlError)."""
        if self._listener is None:
            # listening before asking: no event between the answer and the first read is lost
            self._listener = EventListener()
            self._qmp.register_listener(self._listener)
        if events is None:
            self.execute("subscribe")
        else:
            self.execute("subscribe", events=list(events))

    def events(self) -> Iterator[EventRecord]:
        """Events as they come (after `subscribe`), until the daemon goes away or
        `interrupt` is called; then DaemonUnreachable."""
        while True:
            event = self.next_event(None)
            assert event is not None  # no timeout: it waits for one
            yield event

    def next_event(self, timeout: float | None) -> EventRecord | None:
        """The next event (after `subscribe`); None if none came within `timeout` seconds
        (None: wait for one); DaemonUnreachable once the daemon has gone. The timeout is
        kept on the loop, so an event that arrives as it ends is returned, never lost."""
        if self._listener is None:
            raise RuntimeError("subscribe first: a connection receives no events before it")
        return self._run(self._next_event(self._listener, timeout), None)

    async def _next_event(
        self, listener: EventListener, timeout: float | None
    ) -> EventRecord | None:
        held, self._held = self._held, None
        if held is not None:
            return held
        deadline = None if timeout is None else self._loop.time() + timeout
        while listener.empty():
            if self._qmp.runstate is not Runstate.RUNNING:
                raise EOFError
            left = None if deadline is None else deadline - self._loop.time()
            if left is not None and left <= 0:
                return None
            arrived = asyncio.ensure_future(listener.get())
            changed = asyncio.ensure_future(self._qmp.runstate_changed())
            try:
                await asyncio.wait(
                    {arrived, changed}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
            finally:  # also when cancelled: a stray get() would eat an event
                changed.cancel()
                if arrived.done() and not arrived.cancelled():
                    self._held = dict(arrived.result())
                else:
                    arrived.cancel()
            held, self._held = self._held, None
            if held is not None:
                return held
        return dict(await listener.get())

    def interrupt(self) -> None:
        """Wake a thread blocked reading events: it sees the connection end."""
        with self._lock:
            if not self._closed:
                self._loop.call_soon_threadsafe(self._start_disconnect)

    def _start_disconnect(self) -> None:
        task = self._loop.create_task(self._disconnect())
        task.add_done_callback(lambda _: None)

    async def _disconnect(self) -> None:
        # the library re-raises what ended its reader (EOFError when the daemon left first)
        with contextlib.suppress(Exception):
            await self._qmp.disconnect()

    def close(self) -> None:
        """Disconnect; a thread still waiting on this client gets DaemonUnreachable."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._disconnect(), self._loop).result(5.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join()
        for future in list(self._pending):  # never to run now
            future.cancel()
        # the library's tasks and our waits end here, not as warnings at exit
        left = asyncio.all_tasks(self._loop)
        for task in left:
            task.cancel()
        if left:
            self._loop.run_until_complete(asyncio.wait(left))
        self._loop.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
