"""`seqguard rekey` against a real Redis (the session's embedded redis-server): users' keys
move from one user tag key (SEQGUARD_USER_TAG_KEY) to another with their TTLs, and the
window store under the new key sees the same windows and idempotency records."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from typer.testing import CliRunner

from app.cli import cli
from app.windows import WindowStore, user_keys

T = TypeVar("T")
KEY_A, KEY_B = "tag-key-a-0f3e9c", "tag key b, é 7d21"  # the second: UTF-8 past ASCII
ALICE, BOB, CAROL = "alice.rekey@example.com", "90817263", "carol.rekey@example.com"
NOBODY = "nobody.rekey@example.com"
TTL_W, TTL_I = 600, 1800  # different TTLs per key: each must keep its own
runner = CliRunner()


@pytest.fixture(autouse=True)
def _keys_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keys travel by the names of variables; SEQGUARD_LOG_FORMAT unset: plain lines."""
    monkeypatch.setenv("SG_OLD_TAG_KEY", KEY_A)
    monkeypatch.setenv("SG_NEW_TAG_KEY", KEY_B)
    monkeypatch.delenv("SG_UNSET_TAG_KEY", raising=False)
    monkeypatch.delenv("SEQGUARD_LOG_FORMAT", raising=False)


def run(url: str, body: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    async def main() -> T:
        async with aioredis.Redis.from_url(url) as r:
            return await body(r)

    return asyncio.run(main())


def store(r: aioredis.Redis, key: str | None) -> WindowStore:
    return WindowStore(r, history=8, window_ttl_s=TTL_W, idempotency_ttl_s=TTL_I,
                       tag_key=(key or "").encode("utf-8"))


def ev(eid: str, ts: int, user: str) -> dict[str, Any]:
    return {"event_id": eid, "user_id": user, "event_type": "view", "timestamp": ts, "item_id": f"i-{eid}"}


def answer(eid: str, user: str, p: float) -> bytes:
    return orjson.dumps({"event_id": eid, "user_id": user, "anomaly_probability": p, "decision": "allow",
                         "thresholds": {"review": 0.5, "block": 0.9}, "window_size": 1, "model_version": "m1",
                         "duplicate": False})


def write(url: str, key: str | None, user: str, n: int, prefix: str = "e") -> None:
    """``n`` events of ``user`` through a store with tag key ``key``, each with its first answer saved."""

    async def body(r: aioredis.Redis) -> None:
        s = store(r, key)
        for i in range(n):
            await s.append(ev(f"{prefix}{i}", 1_700_000_000_000 + i, user))
        await s.save_answers([(user, f"{prefix}{i}", answer(f"{prefix}{i}", user, i / 10)) for i in range(n)])

    run(url, body)


def held(url: str, key: str | None, user: str) -> dict[str, Any]:
    """What a store with tag key ``key`` holds about ``user`` (an access request's answer)."""
    return run(url, lambda r: store(r, key).stored(user))


def snapshot(url: str) -> dict[bytes, tuple[bytes, int]]:
    """Every key of the Redis: its DUMP and its TTL in whole seconds."""
    with redis.Redis.from_url(url) as r:
        return {k: (r.dump(k), r.ttl(k)) for k in r.scan_iter()}  # type: ignore[misc]


def ttls(url: str, keys: tuple[str, ...]) -> list[int]:
    with redis.Redis.from_url(url) as r:
        return [int(r.pttl(k)) for k in keys]  # type: ignore[arg-type]


def rekey(*args: str | Path, input: bytes | None = None) -> tuple[int, str]:
    res = runner.invoke(cli, ["rekey", *map(str, args)], input=input)
    assert "Traceback" not in res.output, res.output
    return res.exit_code, " ".join(res.output.split())  # unwrap the console's line folding


def users_file(tmp_path: Path, text: str, encoding: str = "utf-8-sig", name: str = "users.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def no_user_id_in(out: str) -> bool:
    return not any(u in out for u in (ALICE, BOB, CAROL, NOBODY, "alice", "carol", "nobody"))


# ---------------------------------------------------------------------------------------


def test_rekey_moves_windows_ttls_and_idempotency_records_to_the_new_key(redis_url: str, tmp_path: Path) -> None:
    write(redis_url, KEY_A, ALICE, 3)
    write(redis_url, KEY_A, BOB, 1)
    before = {u: held(redis_url, KEY_A, u) for u in (ALICE, BOB)}
    old_ttls = ttls(redis_url, user_keys(ALICE, KEY_A.encode()))
    assert old_ttls[0] <= TTL_W * 1000 < old_ttls[2] <= TTL_I * 1000  # window vs idempotency records
    # A BOM (Windows tools write one), CRLF line ends and blank lines; NOBODY has no keys.
    users = users_file(tmp_path, f"{ALICE}\r\n\r\n{BOB}\r\n   \r\n{NOBODY}\r\n{BOB}\r\n")

    t0 = time.monotonic()
    code, out = rekey("--redis-url", redis_url, "--users", users, "--from-key-env", "SG_OLD_TAG_KEY",
                      "--to-key-env", "SG_NEW_TAG_KEY")
    elapsed_ms = (time.monotonic() - t0) * 1000
    assert code == 0, out
    assert "4 users read (1 listed more than once, counted once); moved 2, absent 1" in out, out
    assert "conflicts 0" in out and "from the tag keyed by $SG_OLD_TAG_KEY to the tag keyed by $SG_NEW_TAG_KEY" in out
    assert no_user_id_in(out) and KEY_A not in out and KEY_B not in out, out

    # Every key is under the new tag now, each with the TTL it had.
    keys = {k.decode() for k in snapshot(redis_url)}
    assert keys == {*user_keys(ALICE, KEY_B.encode()), *user_keys(BOB, KEY_B.encode())}
    for old, new in zip(old_ttls, ttls(redis_url, user_keys(ALICE, KEY_B.encode())), strict=True):
        assert old - elapsed_ms - 1000 <= new <= old, (old, new)

    # A store with the new key sees the same windows and idempotency records.
    assert {u: held(redis_url, KEY_B, u) for u in (ALICE, BOB)} == before
    assert held(redis_url, KEY_A, ALICE) == {"events": [], "event_ids": []}

    async def replay(r: aioredis.Redis) -> None:
        s = store(r, KEY_B)
        again = await s.append(ev("e1", 1_700_000_000_001, ALICE))  # answered under key A
        assert again.duplicate and again.answer is not None
        assert orjson.loads(again.answer) == orjson.loads(answer("e1", ALICE, 0.1))
        new = await s.append(ev("e3", 1_700_000_000_003, ALICE))
        assert not new.duplicate and [e["event_id"] for e in new.events] == ["e0", "e1", "e2", "e3"]

    run(redis_url, replay)


def test_a_user_with_keys_under_the_new_key_is_a_conflict_and_left_as_it_is(redis_url: str, tmp_path: Path) -> None:
    write(redis_url, KEY_A, CAROL, 2)
    write(redis_url, KEY_B, CAROL, 1, prefix="new")  # the service wrote under the new key already
    write(redis_url, KEY_A, ALICE, 1)
    carol_before = {k: v for k, v in snapshot(redis_url).items() if k.decode() not in user_keys(ALICE, KEY_A.encode())}
    code, out = rekey("--redis-url", redis_url, "--users", users_file(tmp_path, f"{CAROL}\n{ALICE}\n"),
                      "--from-key-env", "SG_OLD_TAG_KEY", "--to-key-env", "SG_NEW_TAG_KEY")
    assert code == 0, out
    assert "2 users read; moved 1, absent 0 (no keys under the old tag), conflicts 1" in out, out
    assert "1 users were skipped: they have keys under the new tag already" in out and no_user_id_in(out), out
    after = snapshot(redis_url)
    assert {k: v for k, v in after.items() if k in carol_before} == carol_before, "Carol's keys, both tags, untouched"
    assert [e["event_id"] for e in held(redis_url, KEY_B, CAROL)["events"]] == ["new0"]
    assert [e["event_id"] for e in held(redis_url, KEY_B, ALICE)["events"]] == ["e0"]


def test_a_dry_run_counts_and_writes_nothing(redis_url: str, tmp_path: Path) -> None:
    write(redis_url, KEY_A, ALICE, 2)
    write(redis_url, KEY_A, CAROL, 1)
    write(redis_url, KEY_B, CAROL, 1, prefix="new")
    before = snapshot(redis_url)
    code, out = rekey("--redis-url", redis_url, "--users", users_file(tmp_path, f"{ALICE}\n{CAROL}\n{NOBODY}\n"),
                      "--from-key-env", "SG_OLD_TAG_KEY", "--to-key-env", "SG_NEW_TAG_KEY", "--dry-run")
    assert code == 0, out
    assert "dry run, nothing written: 3 users read; would move 1, absent 1 (no keys under the old tag), conflicts 1" \
        in out, out
    assert snapshot(redis_url) == before and no_user_id_in(out)


def test_unkeyed_tags_move_to_a_key_read_from_stdin(redis_url: str) -> None:
    """The first rekey of every existing deployment: from the unkeyed tag (no key, or a
    variable that is unset) to a key; the users file on stdin, with a BOM."""
    write(redis_url, None, ALICE, 2)
    before = held(redis_url, None, ALICE)
    code, out = rekey("--redis-url", redis_url, "--users", "-", "--from-key-env", "SG_UNSET_TAG_KEY",
                      "--to-key-env", "SG_NEW_TAG_KEY", input=f"\ufeff{ALICE}\n".encode())
    assert code == 0, out
    assert "1 users read; moved 1" in out, out
    assert "from the unkeyed tag (the variable --from-key-env names is not set)" in out, out
    assert "SG_UNSET_TAG_KEY" not in out, "an unset name is never echoed: it may be a key typed by mistake"
    assert held(redis_url, KEY_B, ALICE) == before and held(redis_url, None, ALICE)["events"] == []
    # and back, the old key given by no option at all
    code, out = rekey("--redis-url", redis_url, "--users", "-", "--from-key-env", "SG_NEW_TAG_KEY",
                      input=ALICE.encode())
    assert code == 0 and "moved 1" in out and "to the unkeyed tag (--to-key-env not given)" in out, out
    assert held(redis_url, None, ALICE) == before


def _closed_port() -> int:
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(("make_args", "said"), [
    (lambda url, users, tmp: ["--redis-url", url], "Missing option '--users'"),
    (lambda url, users, tmp: ["--redis-url", url, "--users", tmp / "missing.txt", "--to-key-env", "SG_NEW_TAG_KEY"],
     "missing.txt: no such file"),
    (lambda url, users, tmp: ["--redis-url", url, "--users", tmp, "--to-key-env", "SG_NEW_TAG_KEY"],
     "a directory, not a file of user ids"),
    (lambda url, users, tmp: ["--redis-url", url, "--users", users_file(tmp, "\n\n  \n", name="empty.txt"),
                              "--to-key-env", "SG_NEW_TAG_KEY"], "no user ids (an empty file, or blank lines only)"),
    (lambda url, users, tmp: ["--redis-url", url, "--users", _latin1(tmp), "--to-key-env", "SG_NEW_TAG_KEY"],
     "latin1.txt: line 2: not UTF-8"),
    (lambda url, users, tmp: ["--redis-url", url, "--users", users], "are the same: nothing to move"),
    (lambda url, users, tmp: ["--redis-url", url, "--users", users, "--from-key-env", "SG_OLD_TAG_KEY",
                              "--to-key-env", "SG_OLD_TAG_KEY"], "are the same: nothing to move"),
    (lambda url, users, tmp: ["--redis-url", url, "--users", users, "--to-key-env", "SG_LONG_TAG_KEY"],
     "SG_LONG_TAG_KEY is 65 bytes long (UTF-8); a user tag key has at most 64"),
    (lambda url, users, tmp: ["--redis-url", f"redis://127.0.0.1:{_closed_port()}/0?password=pa55word", "--users",
                              users, "--to-key-env", "SG_NEW_TAG_KEY"], "password=***"),  # redis-py's query form
    (lambda url, users, tmp: ["--redis-url", f"redis://:pa55word@127.0.0.1:{_closed_port()}/0", "--users", users,
                              "--to-key-env", "SG_NEW_TAG_KEY"], "cannot reach Redis at redis://:***@127.0.0.1:"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(make_args: Callable[..., list[Any]], said: str,
                                                         redis_url: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SG_LONG_TAG_KEY", "k" * 65)
    write(redis_url, None, ALICE, 1)
    before = snapshot(redis_url)
    users = users_file(tmp_path, f"{ALICE}\n")
    code, out = rekey(*make_args(redis_url, users, tmp_path))
    assert code == 2 and said in out, out
    assert no_user_id_in(out) and "pa55word" not in out and "k" * 65 not in out, out
    assert snapshot(redis_url) == before


def _latin1(tmp: Path) -> Path:
    """A users file whose second line is Latin-1, not UTF-8."""
    path = tmp / "latin1.txt"
    path.write_bytes("user-1\nrené\n".encode("latin-1"))
    return path


def test_without_a_url_the_embedded_redis_data_is_opened_and_a_busy_one_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh-user review: with `make run`'s embedded Redis the service's port changes at
    each start, and the documented "service stopped" procedure could not reach it. Without
    --redis-url the command opens SEQGUARD_REDIS_DATA_DIR itself (the service stopped), and
    refuses while a service holds it."""
    from app.embedded_redis import EmbeddedRedis

    data = tmp_path / "redis"
    monkeypatch.setenv("SEQGUARD_REDIS_DATA_DIR", str(data))
    with EmbeddedRedis(data) as server:  # the service, before it stops
        write(server.url, None, ALICE, 3)
        code, out = rekey("--users", users_file(tmp_path, f"{ALICE}\n"), "--to-key-env", "SG_NEW_TAG_KEY")
        assert code == 2 and "SEQGUARD_REDIS_DATA_DIR" in out, out  # busy: held by the running server
    code, out = rekey("--users", users_file(tmp_path, f"{ALICE}\n{NOBODY}\n"), "--to-key-env", "SG_NEW_TAG_KEY")
    assert code == 0 and "moved 1, absent 1" in out and no_user_id_in(out), out
    with EmbeddedRedis(data) as server:  # the service, started again with the new key
        assert [e["event_id"] for e in held(server.url, KEY_B, ALICE)["events"]] == ["e0", "e1", "e2"]
        assert held(server.url, None, ALICE)["events"] == []
