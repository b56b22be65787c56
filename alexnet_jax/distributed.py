"""Multi-process runs: joining the jax.distributed cluster, and never hanging when a process dies.

Every train step is a collective over the devices of all processes, so a process that dies
leaves the others blocked in a collective that cannot finish. JAX's coordination service notices
a dead process only after its heartbeat timeout (100 s by default), and then aborts the others
with a C++ stack trace; a process that fails to connect aborts the same way. This module puts a
clear one-line message and a short, configurable timeout in front of both:

- `initialize` joins the cluster; a process that cannot join within `init_timeout` prints one
  line and exits 1.
- A watchdog thread per process beats into the coordination service's key-value store every
  few seconds. Process 0 (which hosts the service) watches the beats; when one stops for
  `heartbeat_timeout` seconds it posts a verdict that every process reads, prints and exits on.
  A process that loses the coordinator itself exits after the same time.
- `leave(status)` is how a process ends: with status 0 it says so (a finished process is not a
  dead one) and the normal shutdown follows; otherwise it posts its failure, so the others exit
  at once with the same status instead of waiting for a timeout, and exits without the shutdown
  barrier (which would wait for processes that are stuck in a collective).

JAX's own heartbeat timeout is set to twice ours: a backstop, should the watchdog itself stall.

One case keeps JAX's message: when process 0 dies, the coordination service dies with it, and
JAX aborts every other process within a second ("Terminating process because the JAX distributed
service detected fatal errors. This most likely indicates that another task died", then a stack
trace). The client's hook for replacing that (`missed_heartbeat_callback`) crashes in jaxlib 0.10
(std::bad_cast when it is called), so it stays JAX's; it is fast, and it says what happened.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from typing import Any

PREFIX = "alexnet_jax/watchdog"
_watchdog: _Watchdog | None = None


def initialize(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    *,
    heartbeat_timeout: float = 30.0,
    init_timeout: float = 300.0,
) -> None:
    """Calls `jax.distributed.initialize` (arguments None: detected from the cluster's
    environment) with CPU collectives over gloo, then starts the watchdog. Without arguments and
    without a cluster in the environment, it returns at once: a single-process run."""
    import jax

    who = "this process" if process_id is None else f"process {process_id}"
    where = coordinator_address or "the address the cluster environment gives"
    timer = _exit_later(
        init_timeout,
        f"the cluster at {where} did not form within {init_timeout:g} s ({who} waited for the "
        f"others): start all {num_processes or 'the'} processes with the same "
        "--coordinator_address and --num_processes, process 0 on the host that the address "
        "names, and check that its port is reachable from every host (--init_timeout sets "
        "the wait)",
    )
    try:
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            # Backstops: JAX aborts (with a stack trace) only after our own timers would have.
            initialization_timeout=int(init_timeout) + 30,
            heartbeat_timeout_seconds=max(int(2 * heartbeat_timeout), 10),
        )
    except (ValueError, RuntimeError) as e:
        # Without flags: JAX's own detection (SLURM, Cloud TPU, ...) found no cluster, so it has
        # no coordinator address (the public way to ask, and it connects to nothing); or JAX
        # already computed in this process (a library user, the tests), which no cluster can
        # join any more. launch.py always asks first, and the explicit flags still raise.
        if coordinator_address is None and ("coordinator_address" in str(e) or "backend" in str(e)):
            return
        raise
    finally:
        timer.cancel()
    # Gloo lets CPU processes (the tests, laptops) form a cluster; GPUs and TPUs ignore it. Set
    # before the first computation creates the CPU backend.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    start_watchdog(heartbeat_timeout, coordinator_address or "the cluster's coordinator")


def start_watchdog(timeout: float, coordinator: str) -> None:
    """Starts the watchdog of an initialised multi-process run (nothing for one process)."""
    global _watchdog
    import jax

    client = _coordination_client()
    if client is None or jax.process_count() == 1 or _watchdog is not None:
        return
    _watchdog = _Watchdog(
        client,
        jax.process_index(),
        jax.process_count(),
        timeout=timeout,
        coordinator=coordinator,
    )
    _watchdog.start()
    # A library user who never calls leave(): a normal exit is a finished process. Registered
    # after JAX's own atexit shutdown, so it runs before it.
    atexit.register(leave, 0)


def _coordination_client() -> Any:
    """The key-value client of the coordination service, or None.

    The one private JAX name in alexnet-jax: jax 0.10 has no public handle on the service's
    key-value store, which the watchdog needs. Orbax reads it the same way
    (`orbax.checkpoint.multihost.get_jax_distributed_client`).
    """
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def is_running() -> bool:
    """Whether this process is part of a multi-process run with its watchdog on."""
    return _watchdog is not None


def leave(status: int) -> None:
    """Ends this process's part in a multi-process run (a no-op in a single-process run).

    Status 0: marks the process finished and stops the watchdog; JAX's shutdown follows at exit.
    Otherwise: tells the other processes, which exit with the same status, and exits now.
    """
    global _watchdog
    watchdog, _watchdog = _watchdog, None
    if watchdog is None:
        return
    if status == 0:
        watchdog.finish()
        return
    watchdog.fail(status)
    _flush()
    os._exit(status)


class _Watchdog:
    """Beats, and on process 0 watches the beats; see the module docstring."""

    def __init__(self, client: Any, pid: int, count: int, *, timeout: float, coordinator: str):
        self.client, self.pid, self.count = client, pid, count
        self.timeout = timeout
        self.interval = min(max(timeout / 10, 0.2), 3.0)
        self.coordinator = coordinator
        self._stop = threading.Event()
        self._last_ok = time.monotonic()  # the last time the coordination service answered
        self._seen: dict[int, tuple[str, float]] = {}  # peer -> (its last beat, when it changed)
        self._beats = 0

    def start(self) -> None:
        for target in (self._beat_loop, self._judge_loop):
            threading.Thread(target=target, name=f"watchdog-{target.__name__}", daemon=True).start()

    # --- the two threads -----------------------------------------------------------------------

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beats += 1
                self.client.key_value_set(
                    f"{PREFIX}/beat/{self.pid}", str(self._beats), allow_overwrite=True
                )
                verdicts = self.client.key_value_dir_get(f"{PREFIX}/verdict/")
                beats = self.client.key_value_dir_get(f"{PREFIX}/beat/") if self.pid == 0 else []
            except Exception:  # the coordinator is unreachable: the judge's timeout decides
                continue
            self._last_ok = time.monotonic()
            if self._stop.is_set():
                return
            for key, value in verdicts:
                author = int(key.rsplit("/", 1)[1])
                if author != self.pid:
                    self._exit_on(author, value)
            if self.pid == 0:
                self._check_beats(dict(beats), self._done())

    def _judge_loop(self) -> None:
        """Separate from the beats, so that an RPC that hangs (not fails) is noticed too."""
        while not self._stop.wait(self.interval):
            silent = time.monotonic() - self._last_ok
            if silent > self.timeout and self.pid != 0:
                self._exit(
                    1,
                    f"lost contact with the coordinator {self.coordinator} (process 0) for "
                    f"{silent:.0f} s",
                )

    # --- process 0 -----------------------------------------------------------------------------

    def _check_beats(self, beats: dict[str, str], done: set[int]) -> None:
        now = time.monotonic()
        for peer in range(1, self.count):
            beat = beats.get(f"{PREFIX}/beat/{peer}", "")
            last, since = self._seen.get(peer, (None, now))
            if beat != last:
                self._seen[peer] = (beat, now)
            elif peer not in done and now - since > self.timeout:
                message = (
                    f"process {peer} of {self.count} stopped responding (no heartbeat for "
                    f"{now - since:.0f} s: killed, crashed, or its host is down)"
                )
                self._post(1, "died", message)
                self._wait_for_acks(done | {peer})
                self._exit(1, message)

    # --- ending --------------------------------------------------------------------------------

    def finish(self) -> None:
        self._stop.set()
        try:
            self.client.key_value_set(f"{PREFIX}/done/{self.pid}", "1", allow_overwrite=True)
        except Exception:
            pass

    def fail(self, status: int) -> None:
        """Posts this process's failure; process 0 waits until the others have read it, since
        the key-value store goes down with it."""
        self._stop.set()
        try:  # so that process 0 does not wait for this one to read its own verdict
            self.client.key_value_set(f"{PREFIX}/ack/{self.pid}", "1", allow_overwrite=True)
        except Exception:
            pass
        self._post(
            status, "exited", f"process {self.pid} of {self.count} exited with status {status}"
        )
        if self.pid == 0:
            self._wait_for_acks(self._done())

    def _post(self, status: int, kind: str, message: str) -> None:
        """kind: 'exited' (the process ended itself and printed why) or 'died'."""
        try:
            self.client.key_value_set(
                f"{PREFIX}/verdict/{self.pid}", f"{status}|{kind}|{message}", allow_overwrite=True
            )
        except Exception:  # the others will time out instead
            pass

    def _wait_for_acks(self, absent: set[int]) -> None:
        deadline = time.monotonic() + min(max(3 * self.interval, 2.0), self.timeout)
        waiting = set(range(1, self.count)) - absent
        while waiting and time.monotonic() < deadline:
            try:
                acks = self.client.key_value_dir_get(f"{PREFIX}/ack/")
            except Exception:
                return
            waiting -= _ids(acks)
            time.sleep(0.1)

    def _exit_on(self, author: int, verdict: str) -> None:
        status, kind, message = verdict.split("|", 2)
        if self.pid == 0:  # the others read the verdict from process 0's key-value store
            self._wait_for_acks(self._done() | {author})
        else:
            try:
                self.client.key_value_set(f"{PREFIX}/ack/{self.pid}", "1", allow_overwrite=True)
            except Exception:
                pass
        self._exit(int(status), message, died=kind == "died")

    def _done(self) -> set[int]:
        """The processes that finished normally (an empty set if the store does not answer)."""
        try:
            return _ids(self.client.key_value_dir_get(f"{PREFIX}/done/"))
        except Exception:
            return set()

    def _exit(self, status: int, reason: str, *, died: bool = True) -> None:
        why = (
            "run the same command again to resume from the last checkpoint"
            if died
            else "its own message says why"
        )
        _die(
            status,
            f"{reason}; stopping process {self.pid} too, since no step can finish without it "
            f"({why})",
        )


def _ids(entries: list[tuple[str, str]]) -> set[int]:
    """The process ids that end the keys of a key-value directory listing."""
    return {int(key.rsplit("/", 1)[1]) for key, _ in entries}


def _die(status: int, message: str, *, newline: bool = True) -> None:
    """One line on stderr, then exit at once: the main thread is blocked in a collective."""
    _flush()
    try:
        # A leading newline ends a progress bar's line, so that the message stands on its own.
        os.write(2, f"{chr(10) if newline else ''}error: {message}\n".encode())
    finally:
        os._exit(status)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _exit_later(seconds: float, message: str) -> threading.Timer:
    timer = threading.Timer(seconds, _die, args=(1, message), kwargs={"newline": False})
    timer.daemon = True
    timer.start()
    return timer
