#!/bin/sh
# Starts this cell's sample-cell process, detached from terraform (own session, output to a
# file, pid file), and waits until it listens. Every input arrives as an environment
# variable set by the local-exec provisioner; nothing here is rendered from user input.
set -eu

mkdir -p "$DATA_DIR"

# A process left by an earlier (interrupted) run of this cell is replaced, never doubled.
if [ -f "$PID_FILE" ]; then
    old=$(cat "$PID_FILE" 2>/dev/null || true)
    case "$old" in
    '' | *[!0-9]*) ;;
    *)
        if grep -q sample-cell "/proc/$old/cmdline" 2>/dev/null; then
            kill "$old" 2>/dev/null || true
            i=0
            while kill -0 "$old" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
            kill -9 "$old" 2>/dev/null || true
        fi
        ;;
    esac
    rm -f "$PID_FILE"
fi

if [ "${BOOT_DELAY_SECS:-0}" != 0 ]; then
    echo "boot delay: waiting ${BOOT_DELAY_SECS}s"
    sleep "$BOOT_DELAY_SECS"
fi

echo "starting sample-cell $APP_VERSION for cell $CELL_ID on 127.0.0.1:$PORT"
# A fresh log: the readiness check below must not see an earlier process's banner.
: >"$LOG_FILE"
SAMPLE_CELL_ADMIN_TOKEN="$ADMIN_TOKEN" SAMPLE_CELL_FAULT_RATE="$FAULT_RATE" \
    SAMPLE_CELL_EXTRA_LATENCY_MS="$EXTRA_LATENCY_MS" CELL_INSTANCE_CLASS="$INSTANCE_CLASS" \
    CELL_OWNER="$CELL_OWNER" \
    setsid nohup "$SAMPLE_CELL_BIN" --listen "127.0.0.1:$PORT" --cell-id "$CELL_ID" \
    --data-dir "$DATA_DIR" --app-version "$APP_VERSION" \
    >"$LOG_FILE" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$PID_FILE"

i=0
while [ "$i" -lt 300 ]; do
    if grep -q 'listening on' "$LOG_FILE" 2>/dev/null; then
        echo "sample-cell is up (pid $pid)"
        exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "sample-cell exited during startup; its log:" >&2
        tail -n 20 "$LOG_FILE" >&2 || true
        rm -f "$PID_FILE"
        exit 1
    fi
    sleep 0.05
    i=$((i + 1))
done
echo "sample-cell did not start listening within 15s; its log:" >&2
tail -n 20 "$LOG_FILE" >&2 || true
exit 1
