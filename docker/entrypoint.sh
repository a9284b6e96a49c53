#!/bin/sh
# Container entrypoint: start from an empty prometheus-client multiprocess directory, then
# run the command (by default `seqguard serve`) as PID 1 so that it gets the stop signal.
# Files left by the workers of a previous run (a restarted container keeps its /tmp)
# would otherwise be merged into this run's /metrics.
set -eu
if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    find "$PROMETHEUS_MULTIPROC_DIR" -mindepth 1 -delete
fi
exec "$@"
