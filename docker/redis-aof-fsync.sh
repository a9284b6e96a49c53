#!/bin/sh
# Entrypoint of the redis service: fsync the append-only file once a second from outside
# Redis, then run the image's own entrypoint (which drops to the redis user).
#
# redis.conf sets `appendfsync no`: Redis then writes every command to its AOF before it
# replies, in every event-loop turn, but never fsyncs it. With `everysec` Redis fsyncs
# itself, but while that fsync is slow it holds new writes back for up to 2 s and replies
# all the same, so a crash of Redis loses acknowledged events. Here a crash of Redis or of
# its container loses nothing acknowledged, and a crash of the host at most about
# AOF_FSYNC_INTERVAL_S seconds of events.
set -eu
aof_dir="${AOF_DIR:-/data/appendonlydir}"
interval="${AOF_FSYNC_INTERVAL_S:-1}"
redis_pid=$$  # exec below keeps this pid: the loop ends with the server
(
    while sleep "$interval" && kill -0 "$redis_pid" 2>/dev/null; do
        # Each file (the manifest and the parts, renamed anew by every rewrite), then the
        # directory that names them. A part removed meanwhile is fine; any other failure
        # goes to the log: Redis's own writes still succeed then, only this fsync can tell.
        [ -d "$aof_dir" ] || continue
        if ! out=$(sync "$aof_dir"/* "$aof_dir" 2>&1); then
            printf '%s\n' "$out" | grep -v 'No such file' | sed 's/^/redis-aof-fsync: /' >&2 || true
        fi
    done
) &
exec "$@"
