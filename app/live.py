"""The model a worker serves, and changing it live (hot reload).

A :class:`Served` is everything one bundle needs to answer: the bundle (with the
deployment's event type aliases), its ONNX Runtime session, the thresholds (the bundle's,
or the settings' overrides) and a micro-batcher of its own, warmed up on every shape.
``AppState.live`` holds the current one. A request reads it once and keeps it to the end,
so a swap never changes the model under a request in flight, and its answer names the
model that scored it (``model_version``).

A new bundle is loaded beside the old one (:func:`load_served`, in a thread: nothing waits
on it), checked (:func:`check_bundle`), warmed up, and swapped in with one assignment
(:func:`swap`); the old micro-batcher finishes what it has queued and then stops.

A shadow (:mod:`app.shadow`) is a second :class:`Served`, ``AppState.shadow``: a
candidate that scores the live windows after the answers are sent, with a micro-batcher
of its own that runs in the background (one ONNX Runtime thread, lower CPU priority, no
live metrics). It is loaded by the same checks (:func:`load_served` with ``shadow=True``),
started and stopped by :func:`set_shadow`, and made live by :meth:`ModelWatch.promote`
(loaded again as a live model, then swapped in).

Workers and replicas follow one record in Redis, ``sg:model:live:<deployment>`` (``{"bundle": path,
"version": ..., "base": SEQGUARD_BUNDLE}``): the worker that takes ``POST /admin/model`` or
SIGHUP writes it, and every worker reads it every ``SEQGUARD_MODEL_POLL_S`` seconds
(:class:`ModelWatch`). A worker that starts follows the record only where its ``base`` is
the worker's own ``SEQGUARD_BUNDLE`` (a restarted worker rejoins its siblings' model; a
deployment with a new ``SEQGUARD_BUNDLE`` starts on it and writes the record anew). The
shadow has a record of its own, ``sg:model:shadow:<deployment>``, of the same form (absent: no shadow),
followed the same way (:func:`start_shadow` at a worker's start).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app.core.bundle import DEFAULT_BUNDLE, Bundle, BundleError, load_bundle
from app.core.decisions import Thresholds
from app.core.scorer import OnnxModel
from app.core.vocabulary import alias_warnings
from app.errors import ProblemError
from app.metrics import Metrics
from app.microbatcher import MicroBatcher
from app.settings import Settings
from app.windows import live_model_key, shadow_model_key

log = logging.getLogger("seqguard.live")

#: How long a swapped-out micro-batcher may take to answer what it has queued.
DRAIN_TIMEOUT_S = 30.0
#: How long loading a bundle may take before it is refused (a path that never finishes
#: reading, on a hung network file system say; the stuck thread is left behind).
LOAD_TIMEOUT_S = 120.0
#: A shadow's micro-batcher waits at least this long to fill a batch (fewer, larger
#: batches: less of the CPU the live model shares with it).
SHADOW_MAX_WAIT_MS = 20.0
#: :meth:`ModelWatch.shadow_applied` when no shadow is served (its record absent).
NO_SHADOW: tuple[str, ...] = ()


class NoShadow(ProblemError):
    """``POST /admin/model`` with ``"promote": true`` while no shadow is served: a 409."""

    status, slug, title = 409, "no-shadow", "No shadow to promote"


class BundleRefused(ProblemError):
    """A bundle that cannot replace the live model; ``problems`` says why, one line each.
    As an answer (``POST /admin/model``): 422, the problems listed, the live model serving on."""

    status, slug, title = 422, "bundle-refused", "Bundle refused"

    def __init__(self, path: str, problems: list[str]) -> None:
        super().__init__(f"{path} cannot be served: " + "; ".join(problems), problems=problems)
        self.path, self.problems = path, problems


@dataclass(frozen=True)
class Served:
    """One bundle, ready to answer: read ``AppState.live`` once per request."""

    bundle: Bundle
    model: OnnxModel
    thresholds: Thresholds
    batcher: MicroBatcher
    path: str  # as asked for (SEQGUARD_BUNDLE, the admin route's body): a symlink stays one
    loaded_at: float  # epoch seconds
    resolved: str  # the directory ``path`` led to when it was loaded (symlinks followed)
    digest: str  # of bundle.json as loaded: two bundles of one version can differ (thresholds)

    @property
    def version(self) -> str:
        return self.bundle.version


def bundle_path(settings: Settings) -> str:
    """The path ``SEQGUARD_BUNDLE`` names (the shipped bundle when unset), made absolute
    (symlinks kept: re-pointing one and SIGHUP is how a deployment changes models)."""
    return os.path.abspath(settings.bundle if settings.bundle is not None else DEFAULT_BUNDLE)


def check_bundle(bundle: Bundle, *, store_history: int | None) -> list[str]:
    """What stops ``bundle`` from replacing a live model (empty: nothing).

    Its parity record (``seqguard export`` compares ONNX Runtime with PyTorch and records
    the largest difference and its tolerance) must be there and within tolerance, and its
    featurizer may not need more of a user's events than the window store keeps
    (``store_history``: the live store's events per window; ``None``: no store yet).
    """
    problems = []
    parity = bundle.meta.get("parity", {}).get("fp32")
    if not isinstance(parity, dict) or "max_abs_diff" not in parity:
        problems.append("no parity record (bundle.json parity.fp32): export it with `seqguard export`")
    else:
        over = parity.get("max_diff_over_allowed") or {}
        try:
            past = not isinstance(over, dict) or any(not float(v) <= 1.0 for v in over.values())
        except (TypeError, ValueError):
            past = True
        if past:
            problems.append(f"parity past its tolerance (or unreadable): {over!r:.200}")
    if store_history is not None and bundle.spec.history > store_history:
        problems.append(f"its featurizer needs {bundle.spec.history} events per user, the window store "
                        f"returns {store_history}: restart the service to serve it")
    return problems


def load_served(path: str, settings: Settings, metrics: Metrics, *, store_history: int | None = None,
                shadow: bool = False) -> Served:
    """Load, check and warm up the bundle at ``path`` (slow: seconds; call it in a thread
    while serving; a worker's first bundle passes the same checks, ``store_history=None``).
    A ``shadow`` gets one ONNX Runtime thread and a background micro-batcher that feeds no
    metrics (:class:`~app.microbatcher.MicroBatcher`), and the same checks.

    Raises:
        BundleRefused: the bundle is missing, unreadable, or fails :func:`check_bundle`, or
            the settings' threshold overrides cross its thresholds.
    """
    try:
        loaded = load_bundle(path)
    except (BundleError, OSError, ValueError, KeyError) as e:
        raise BundleRefused(path, [str(e)]) from None
    try:
        problems = check_bundle(loaded, store_history=store_history)
    except Exception as e:  # a bundle.json of unexpected shapes: refused, never a 500
        problems = [f"bundle.json unreadable: {type(e).__name__}: {e}"]
    bundle = loaded.with_aliases(settings.event_aliases)
    thresholds = model = None
    try:
        thresholds = bundle.thresholds.override(review=settings.review_threshold, block=settings.block_threshold)
    except Exception as e:
        problems.append(f"thresholds: {e}")
    try:
        model = OnnxModel(bundle, threads=1 if shadow else settings.inference_threads,
                          prefer_cuda=settings.prefer_cuda, precision=settings.served_precision)
    except BundleError as e:
        problems.append(str(e))
    except Exception as e:  # ONNX Runtime's own errors: a file it cannot load
        problems.append(f"ONNX Runtime cannot load it: {type(e).__name__}: {e}")
    if problems or thresholds is None or model is None:
        raise BundleRefused(path, problems)
    wait_ms = max(settings.max_wait_ms, SHADOW_MAX_WAIT_MS) if shadow else settings.max_wait_ms
    batcher = MicroBatcher(model, None if shadow else metrics, thresholds=thresholds, max_batch=settings.max_batch,
                           max_wait_ms=wait_ms, queue_size=settings.queue_size, background=shadow)
    try:
        batcher.warm_up()
    except Exception as e:  # a model whose inputs or outputs are not the contract's
        raise BundleRefused(path, [f"warm-up failed: {type(e).__name__}: {e}"]) from None
    for warning in alias_warnings(settings.event_aliases, loaded.spec.aliases, loaded.spec.event_types):
        log.warning("SEQGUARD_EVENT_ALIASES: %s", warning)
    digest = hashlib.sha256(orjson.dumps(loaded.meta, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
    return Served(bundle, model, thresholds, batcher, path, time.time(), os.path.realpath(path), digest)


async def swap(state: Any, new: Served) -> Served:
    """Make ``new`` (started here) the model of ``state`` (an ``AppState``) and let the old
    one finish: its micro-batcher answers what it has queued, then stops. Returns the old."""
    await new.batcher.start()
    old: Served = state.live
    state.live = new  # one assignment: a request sees the old model or the new, never a mix
    state.metrics.set_model_info(new.version, new.model.provider, new.bundle.arch)
    log.info("now serving %s (%s, from %s; was %s)", new.version, new.model.provider, new.path, old.version)
    task = asyncio.create_task(_retire(old), name=f"retire-{old.version}")
    state.retired.add(task)
    task.add_done_callback(state.retired.discard)
    return old


async def set_shadow(state: Any, new: Served | None) -> Served | None:
    """Make ``new`` (a shadow, started here; ``None``: none) the shadow of ``state`` and
    retire the one before, as :func:`swap` retires a live model. Returns the old one."""
    if new is not None:
        await new.batcher.start()
    old: Served | None = state.shadow
    state.shadow = new
    state.metrics.set_shadow_info(None if new is None else (new.version, new.model.provider, new.bundle.arch))
    if new is not None:
        log.info("shadow: %s (%s, from %s) scores the live windows after their answers", new.version,
                 new.model.provider, new.path)
    elif old is not None:
        log.info("shadow %s stopped", old.version)
    if old is not None:
        task = asyncio.create_task(_retire(old), name=f"retire-shadow-{old.version}")
        state.retired.add(task)
        task.add_done_callback(state.retired.discard)
    return old


async def _retire(old: Served) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while old.batcher.pending and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await old.batcher.stop()


async def read_record(redis: aioredis.Redis, base: str) -> dict[str, Any] | None:
    """The live model's record of the deployment ``base`` (its ``SEQGUARD_BUNDLE``) in
    Redis (``None``: none, unreadable, or Redis down)."""
    try:
        raw = await redis.get(live_model_key(base))
    except (RedisError, OSError):
        return None
    return _parse_record(raw)


def _parse_record(raw: bytes | str | None) -> dict[str, Any] | None:
    try:
        record = orjson.loads(raw) if raw is not None else None
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and {"bundle", "version"} <= record.keys() else None


def shadow_setting(settings: Settings) -> str | None:
    """``SEQGUARD_SHADOW_BUNDLE`` made absolute (``None``: unset)."""
    return None if settings.shadow_bundle is None else os.path.abspath(settings.shadow_bundle)


async def read_shadow(redis: aioredis.Redis, base: str, setting: str | None) -> tuple[bool, dict[str, Any] | None]:
    """(readable, record): the shadow's record where it belongs to this deployment, the
    same ``SEQGUARD_BUNDLE`` (``base``) and ``SEQGUARD_SHADOW_BUNDLE`` (``setting``), else
    ``None``; readable is False where Redis did not answer (nothing to follow then: an
    outage must not stop every worker's shadow). A record of another deployment (a
    rolling deploy's old workers, an old configuration) is not this worker's to follow:
    an attack review saw a new deployment take its predecessor's shadow within a poll,
    and a worker restarted after a stop or a promotion bring its settings' shadow back."""
    try:
        raw = await redis.get(shadow_model_key(base, setting))
    except (RedisError, OSError):
        return False, None
    record = _parse_record(raw)
    if record is None or record.get("base") != base or record.get("setting") != setting:
        return True, None
    return True, record


def shadow_key(record: dict[str, Any] | None) -> tuple[str, ...]:
    """:func:`record_key` of a shadow record; :data:`NO_SHADOW` for none, or one that says
    none (``"bundle": null``: the shadow was stopped or promoted)."""
    return NO_SHADOW if record is None or record.get("bundle") is None else record_key(record)


def record_key(record: dict[str, Any]) -> tuple[str, ...]:
    """What tells one model of the live record from another: its path, version and
    bundle.json digest (two workers writing the same model after one SIGHUP write one key)."""
    return str(record["bundle"]), str(record["version"]), str(record.get("digest"))


async def write_record(redis: aioredis.Redis, served: Served, base: str) -> tuple[str, ...]:
    """Tell every worker and replica on this Redis to serve ``served``; returns the
    record's :func:`record_key`."""
    record = {"bundle": served.path, "version": served.version, "digest": served.digest, "base": base,
              "at": round(time.time(), 3)}
    await redis.set(live_model_key(base), orjson.dumps(record))
    return record_key(record)


async def write_shadow_record(redis: aioredis.Redis, served: Served | None, base: str,
                              setting: str | None) -> tuple[str, ...]:
    """Tell every worker and replica of this deployment (``base``, ``setting``:
    :func:`read_shadow`) to run ``served`` as their shadow; ``None`` is written too (a
    record that says none), so that a worker that restarts keeps a stop or a promotion
    rather than its settings' shadow. Returns :func:`shadow_key`."""
    record = {"bundle": None if served is None else served.path, "version": None if served is None else served.version,
              "digest": None if served is None else served.digest, "base": base, "setting": setting,
              "at": round(time.time(), 3)}
    await redis.set(shadow_model_key(base, setting), orjson.dumps(record))
    return shadow_key(record)


async def follow_record(redis: aioredis.Redis, served: Served, base: str, settings: Settings, metrics: Metrics,
                        store_history: int) -> tuple[Served, tuple[str, ...] | None]:
    """At a worker's start: the model its siblings serve where the live record was written
    under the same ``SEQGUARD_BUNDLE`` (``base``) and names another version; else ``served``,
    which then becomes the record (a new deployment's bundle wins over an old reload).
    Returns the model and the :func:`record_key` of the record it serves (``None``: none
    could be read or written)."""
    record = await read_record(redis, base)
    if record is not None and record.get("base") == base:
        if record["version"] == served.version:
            return served, record_key(record)
        try:
            other = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, lambda: load_served(
                str(record["bundle"]), settings, metrics, store_history=store_history)), LOAD_TIMEOUT_S)
            if other.version != record["version"]:
                raise BundleRefused(str(record["bundle"]), [f"it holds {other.version} now, not {record['version']}"])
        except (BundleRefused, TimeoutError) as e:
            log.error("the live record names %s, refused here: %s; serving %s", record["version"], e, served.version)
            return served, record_key(record)
        log.info("following the live record: %s (from %s) instead of %s", other.version, other.path, served.version)
        return other, record_key(record)
    try:
        return served, await write_record(redis, served, base)
    except (RedisError, OSError):
        return served, None


async def start_shadow(redis: aioredis.Redis, base: str, settings: Settings, metrics: Metrics,
                       store_history: int) -> tuple[Served | None, tuple[str, ...] | None]:
    """At a worker's start: the shadow its deployment runs now, as the shadow's record says
    where the record is this deployment's (:func:`read_shadow`: a load, stop or promotion
    through the admin route since holds across restarts); else the one
    ``SEQGUARD_SHADOW_BUNDLE`` names (then written as the record), or none. A shadow that
    cannot be loaded is logged and left out: serving never depends on a candidate. Returns
    the shadow (not started) and the :func:`shadow_key` of the record it follows
    (``None``: none could be read or written)."""
    setting = shadow_setting(settings)
    readable, record = await read_shadow(redis, base, setting)
    if record is not None:
        if record.get("bundle") is None:
            return None, NO_SHADOW
        path, version = str(record["bundle"]), str(record["version"])
    elif setting is None:
        return None, NO_SHADOW if readable else None
    else:
        path, version = setting, None
    loop = asyncio.get_running_loop()
    try:
        shadow = await asyncio.wait_for(loop.run_in_executor(None, lambda: load_served(
            path, settings, metrics, store_history=store_history, shadow=True)), LOAD_TIMEOUT_S)
        if version is not None and shadow.version != version:
            raise BundleRefused(path, [f"it holds {shadow.version} now, not {version}"])
    except (BundleRefused, TimeoutError) as e:
        log.error("shadow %s not loaded: %s; serving without a shadow", path, e or "timed out")
        return None, None
    if record is not None:
        return shadow, shadow_key(record)
    try:
        return shadow, await write_shadow_record(redis, shadow, base, setting)
    except (RedisError, OSError):
        return shadow, None


def ignore_sighup_until_serving() -> None:
    """SIGHUP's default action ends the process: a worker still starting (or a lone
    `seqguard serve`) ignores it until :func:`on_sighup` installs the reload (an attack
    review: SIGHUP during start-up took a single-worker service down, rc 129)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def on_sighup(watch: ModelWatch) -> None:
    """SIGHUP reloads ``SEQGUARD_BUNDLE`` (where this thread may take signals: the main
    thread of a worker; not under a test client's thread)."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, lambda: watch.spawn(watch.reload_from_settings()))


class ModelWatch:
    """Each worker's follower of the live record: reloads when another worker (or replica)
    has swapped the model, and reloads ``SEQGUARD_BUNDLE`` on SIGHUP. Loads run in a thread
    and one at a time; a bundle refused is logged once per version and not retried."""

    def __init__(self, state: Any, poll_s: float) -> None:
        self.state, self.poll_s = state, poll_s
        self.lock = asyncio.Lock()  # one load at a time in this worker (poll, SIGHUP, admin route)
        self._refused: set[tuple[str, ...]] = set()
        #: The record this worker serves (followed or written), by :func:`record_key`.
        self.applied: tuple[str, ...] | None = None
        #: The same for the shadow's record (:data:`NO_SHADOW`: none).
        self.shadow_applied: tuple[str, ...] | None = NO_SHADOW
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="model-watch")

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` (a reload) in the background, keeping a reference until it ends."""
        task = asyncio.create_task(coro, name="model-reload")
        self.state.retired.add(task)
        task.add_done_callback(self.state.retired.discard)

    async def stop(self) -> None:
        """Stop following. The flag, not only the cancellation: a cancellation that lands
        inside a Redis call can be turned into an error there (and the loop would go on)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=max(5.0, 2 * self.poll_s))

    async def load(self, path: str, *, publish: str | None = None) -> Served:
        """Load ``path`` and swap it in (``BundleRefused`` leaves the live model serving).

        With ``publish`` (the ``SEQGUARD_BUNDLE`` it is written under), it also becomes the
        live record, before the lock is let go: the follower (:meth:`_run`) reads the record
        under the same lock, so it never takes the record this swap replaces for a newer
        one and swaps the old model back in. A failed write (``RedisError``, ``OSError``)
        is raised after the swap, which stands.
        """
        async with self.lock:
            new = await self._prepare(path)
            await swap(self.state, new)
            self.state.metrics.track_model_reload("ok")
            if publish is not None:
                self.applied = await write_record(self.state.redis, new, base=publish)
            return new

    async def load_shadow(self, path: str | None, *, publish: str) -> Served | None:
        """Load ``path`` as the shadow (``None``: stop shadowing) and make it the shadow's
        record, under ``publish`` (the ``SEQGUARD_BUNDLE`` of the deployment), for every
        worker and replica on this Redis. ``BundleRefused`` leaves the shadow as it was."""
        async with self.lock:
            new = None if path is None else await self._prepare(path, shadow=True)
            await set_shadow(self.state, new)
            self.shadow_applied = await write_shadow_record(self.state.redis, new, publish,
                                                            shadow_setting(self.state.settings))
            return new

    async def promote(self, *, publish: str) -> Served:
        """Make the shadow the live model, in every worker and replica: it is loaded again
        as a live model (its own threads, the live metrics), swapped in, and the shadow
        stopped; the live record names it and the shadow's record goes. Raises
        :class:`NoShadow` where there is none, ``BundleRefused`` where its directory no
        longer holds that version (the live model and the shadow stay as they were)."""
        async with self.lock:
            shadow = self.state.shadow
            if shadow is None:
                raise NoShadow("no shadow is served here: load one with {\"role\": \"shadow\", \"bundle\": ...}")
            new = await self._prepare(shadow.path, version=shadow.version, digest=shadow.digest,
                                      named_by="the shadow")
            await swap(self.state, new)
            await set_shadow(self.state, None)
            self.state.metrics.track_model_reload("ok")
            self.applied = await write_record(self.state.redis, new, base=publish)
            self.shadow_applied = await write_shadow_record(self.state.redis, None, publish,
                                                            shadow_setting(self.state.settings))
            return new

    async def _prepare(self, path: str, version: str | None = None, *, shadow: bool = False,
                       digest: str | None = None, named_by: str = "the live record") -> Served:
        """Load and check ``path`` in a thread, within :data:`LOAD_TIMEOUT_S` (a path that
        never finishes reading must not hold the lock for ever); with ``version`` (and
        ``digest``, of its bundle.json), refuse a bundle that is not that one (a directory
        changed since ``named_by`` named it). Every failure is a ``BundleRefused``; those
        of a live model are counted (``seqguard_model_reloads_total``), a shadow's are not."""
        s = self.state

        def refused() -> None:
            if not shadow:
                s.metrics.track_model_reload("refused")

        loop = asyncio.get_running_loop()
        try:
            new = await asyncio.wait_for(loop.run_in_executor(None, lambda: load_served(
                path, s.settings, s.metrics, store_history=s.store.history, shadow=shadow)), LOAD_TIMEOUT_S)
            if version is not None and new.version != version:
                await new.batcher.stop()
                raise BundleRefused(path, [f"it holds {new.version} now, not {version} as {named_by} says"])
            if digest is not None and new.digest != digest:
                await new.batcher.stop()
                raise BundleRefused(path, [f"its bundle.json changed since {named_by} loaded it (thresholds, "
                                           "say): load it again as the shadow, watch it, then promote"])
        except BundleRefused:
            refused()
            raise
        except TimeoutError:
            refused()
            raise BundleRefused(path, [f"not loaded within {LOAD_TIMEOUT_S:g} s"]) from None
        except Exception as e:  # whatever else a bundle can do to a loader: refused, never a 500
            refused()
            log.exception("loading %s failed", path)
            raise BundleRefused(path, [f"{type(e).__name__}: {e}"]) from None
        return new

    async def reload_from_settings(self) -> None:
        """SIGHUP: load ``SEQGUARD_BUNDLE`` again (a symlink may point elsewhere now) and
        make it the deployment's live model."""
        path = bundle_path(self.state.settings)
        try:
            await self.load(path, publish=path)
        except BundleRefused as e:
            log.error("SIGHUP: %s; still serving %s", e, self.state.live.version)
        except (RedisError, OSError):
            pass  # serving it here; the other workers are told at the next SIGHUP or reload

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.poll_s)
            try:
                if self._new(await read_record(self.state.redis, bundle_path(self.state.settings))) is not None:
                    async with self.lock:
                        # Read again under the lock: a reload of this worker's own (admin route,
                        # SIGHUP) may have swapped and written its record meanwhile.
                        record = self._new(await read_record(self.state.redis, bundle_path(self.state.settings)))
                        if record is not None:
                            await self._follow(record)
                if self._new_shadow(*await self._read_shadow()):
                    async with self.lock:  # read again under the lock, as the live record
                        readable, record = await self._read_shadow()
                        if self._new_shadow(readable, record):
                            await self._follow_shadow(record)
            except asyncio.CancelledError:
                raise
            except Exception:  # the follower must outlive anything one record does
                log.exception("following the live record failed; still serving %s", self.state.live.version)

    async def _read_shadow(self) -> tuple[bool, dict[str, Any] | None]:
        settings = self.state.settings
        return await read_shadow(self.state.redis, bundle_path(settings), shadow_setting(settings))

    def _new_shadow(self, readable: bool, record: dict[str, Any] | None) -> bool:
        """Whether this deployment's shadow record asks for another shadow than this worker
        runs. No record of this deployment: nothing to follow (its shadow came from its
        settings, or there is none)."""
        if not readable or record is None:
            return False
        key = shadow_key(record)
        return key != self.shadow_applied and key not in self._refused

    async def _follow_shadow(self, record: dict[str, Any] | None) -> None:
        """Serve the shadow ``record`` names (none: none), the lock held."""
        if record is None or record.get("bundle") is None:
            await set_shadow(self.state, None)
            self.shadow_applied = NO_SHADOW
            return
        key = record_key(record)
        try:
            new = await self._prepare(str(record["bundle"]), version=str(record["version"]), shadow=True,
                                      named_by="the shadow's record")
        except BundleRefused as e:
            self._refused.add(key)
            log.error("the shadow's record names %s, refused here: %s", record["version"], e)
            return
        await set_shadow(self.state, new)
        self.shadow_applied = key

    def _new(self, record: dict[str, Any] | None) -> dict[str, Any] | None:
        """``record`` where this worker has not applied (or refused) it yet and does not
        serve that very bundle (path, version and bundle.json digest): a bundle posted again
        under the same version (other thresholds, say) is followed too."""
        if record is None or record_key(record) in (self.applied, *self._refused):
            return None
        live = self.state.live
        if record_key(record) == (live.path, live.version, live.digest):
            self.applied = record_key(record)
            return None
        return record

    async def _follow(self, record: dict[str, Any]) -> None:
        """Load the record's bundle (the lock held); a bundle that is not the version the
        record names (its directory changed since) is refused, not served."""
        key = record_key(record)
        try:
            new = await self._prepare(str(record["bundle"]), version=str(record["version"]))
        except BundleRefused as e:
            self._refused.add(key)
            log.error("the live record names %s, refused here: %s; still serving %s",
                      record["version"], e, self.state.live.version)
            return
        await swap(self.state, new)
        self.state.metrics.track_model_reload("ok")
        self.applied = key
