#!/bin/sh
# Stops the cell's sample-cell process named by $PID_FILE (SIGTERM, then SIGKILL after 10 s)
# and removes the pid file. Succeeds when there is nothing to stop.
set -eu
[ -f "$PID_FILE" ] || exit 0
pid=$(cat "$PID_FILE" 2>/dev/null || true)
case "$pid" in
'' | *[!0-9]*)
    rm -f "$PID_FILE"
    exit 0
    ;;
esac
if grep -q sample-cell "/proc/$pid/cmdline" 2>/dev/null; then
    echo "stopping sample-cell (pid $pid)"
    kill "$pid" 2>/dev/null || true
    i=0
    while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 100 ]; do
        # A zombie (exited, not yet reaped by its new parent) counts as stopped.
        state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$pid/status" 2>/dev/null || true)
        [ "$state" = Z ] && break
        sleep 0.1
        i=$((i + 1))
    done
    kill -9 "$pid" 2>/dev/null || true
fi
rm -f "$PID_FILE"
