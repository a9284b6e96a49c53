"""Redis memory per user and per event of the window store.

Appends N events for each of M users into a real Redis (an embedded redis-server of its
own, configured as the service configures it) through ``WindowStore.append_many`` and
saves each event's first answer (``save_answers``), as ``POST /events`` does, then prints
the growth of ``INFO memory used_memory`` (what ``maxmemory`` counts). Events look like
Taobao's (numeric item and category ids, epoch-ms timestamps); answers are the contract's.

    .venv/bin/python tests/benchmarks/bench_redis_footprint.py            # the default grid
    .venv/bin/python tests/benchmarks/bench_redis_footprint.py --users 2000 --events 1 10 80 200
    .venv/bin/python tests/benchmarks/bench_redis_footprint.py --as-before   # as before issue 8

Read: ``per user`` is the cost of a user with one event (its keys); ``per event in the
window`` the cost of each further event while the window grows (up to ``keep`` events);
``per event past the window`` the cost of each further event once the window is full (its
idempotency record alone, kept ``idempotency_ttl_s``, at most ``MAX_IDS_PER_USER``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
from pathlib import Path

import orjson
import redis.asyncio as aioredis
from _common import machine

from app.core.bundle import DEFAULT_BUNDLE, load_bundle
from app.embedded_redis import EmbeddedRedis
from app.windows import WindowStore, user_keys

T0 = 1_511_596_870_000
DAY = 24 * 3600


def event(user: int, k: int) -> dict[str, object]:
    return {"event_id": f"{user}-{k}", "user_id": f"{1_000_000 + user}", "event_type": "pv",
            "timestamp": T0 + 60_000 * k, "item_id": f"{2_000_000 + (user * 7 + k) % 999_983}",
            "category_id": f"{4_000_000 + (user + k) % 9_973}"}


def answer(e: dict[str, object], version: str, size: int) -> bytes:
    return orjson.dumps({"event_id": e["event_id"], "user_id": e["user_id"], "anomaly_probability": 0.0123456789,
                         "decision": "allow", "thresholds": {"review": 0.0512345, "block": 0.9312345},
                         "window_size": size, "model_version": version, "duplicate": False})


async def used(r: aioredis.Redis) -> int:
    return int((await r.info("memory"))["used_memory"])


async def fill(r: aioredis.Redis, store: WindowStore, users: int, events: int, version: str,
               whole_answers: bool) -> int:
    """used_memory growth after ``events`` events of each of ``users`` users (and their answers)."""
    await r.flushall()
    before = await used(r)
    for k in range(events):
        batch = [event(u, k) for u in range(users)]
        for i in range(0, users, 1000):
            chunk = batch[i:i + 1000]
            stored = await store.append_many(chunk)
            items = [(str(e["user_id"]), str(e["event_id"]), answer(e, version, len(w.events)))
                     for e, w in zip(chunk, stored, strict=True)]
            if whole_answers:  # what versions before issue 8 saved: the whole answer, user id included
                await store._save_packed(items)
            else:
                await store.save_answers(items)
    return await used(r) - before


async def main(args: argparse.Namespace) -> None:
    bundle = load_bundle(DEFAULT_BUNDLE)
    history = bundle.spec.history
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp)) as server:
        async with aioredis.Redis.from_url(server.url) as r:
            store = WindowStore(r, history=history, window_ttl_s=7 * DAY, idempotency_ttl_s=7 * DAY)
            if args.as_before:  # Redis's default limits of the compact encodings
                for name in ("zset-max-ziplist-value", "hash-max-ziplist-value"):
                    await r.config_set(name, 64)
            print(f"# window store footprint: {machine()}; redis-server {(await r.info('server'))['redis_version']}; "
                  f"history/keep {history} events; answers {'whole' if args.as_before else 'packed'}")
            grid = {}
            for n in args.events:
                grid[n] = await fill(r, store, args.users, n, bundle.version, args.as_before)
                enc = {kind: (await r.object("encoding", key)) for kind, key in
                       (("window", user_keys(str(1_000_000)).window), ("ids", user_keys(str(1_000_000)).ids))}
                print(f"{args.users:>6} users x {n:>5} events: {grid[n] / 1e6:9.2f} MB, "
                      f"{grid[n] / args.users:10.0f} B/user, {grid[n] / (args.users * n):7.0f} B/event  "
                      f"(encodings: window {enc['window'].decode()}, ids {enc['ids'].decode()})")
            ns = sorted(grid)
            per_user = grid[ns[0]] / args.users / ns[0] if ns[0] == 1 else None
            if per_user is not None:
                print(f"per user (one event): {per_user:,.0f} B")
            for a, b in itertools.pairwise(ns):
                print(f"per further event, {a}->{b} events a user: "
                      f"{(grid[b] - grid[a]) / (args.users * (b - a)):,.0f} B")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=1000, help="users (M)")
    p.add_argument("--events", type=int, nargs="+", default=[1, 10, 80, 200], help="events per user (N), a grid")
    p.add_argument("--as-before", action="store_true",
                   help="as before issue 8: whole answers saved, Redis's default compact-encoding limits")
    asyncio.run(main(p.parse_args()))
