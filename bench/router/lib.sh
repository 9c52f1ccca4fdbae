# Shared by run.sh and cpu.sh: the upstream, the proxy nginx's configuration and helpers.
# Sourced with W (work dir) set.

# The profile the router (and the load generator) are built with: `dist` is `release`
# with fat LTO and one codegen unit (see the workspace Cargo.toml).
PROFILE=${PROFILE:-dist}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

wait_line() { # file prefix -> rest of first matching line
    for _ in $(seq 1 300); do
        l=$(grep -m1 "^$2" "$1" 2>/dev/null || true)
        if [ -n "$l" ]; then echo "${l#"$2"}"; return; fi
        sleep 0.1
    done
    echo "timeout waiting for '$2' in $1" >&2; cat "$1" >&2; exit 1
}

load1() { cut -d' ' -f1 /proc/loadavg; }

# The upstream is its own nginx process (a static 200), shared by every target, so both
# proxies pay the same extra process hop; the proxy nginx is a second instance.
start_upstream() { # port
    {
        echo "worker_processes 2; pid $W/upstream.pid; error_log $W/upstream-error.log warn; daemon on;"
        echo "events { worker_connections 4096; }"
        echo "http { access_log off; keepalive_requests 100000;"
        echo "  server { listen 127.0.0.1:$1 reuseport; location / { default_type text/plain; return 200 \"ok\n\"; } } }"
    } > "$W/upstream.conf"
    nginx -c "$W/upstream.conf"
}

# The proxy nginx, tuned like a production edge: as many workers as the router has
# (2), a SO_REUSEPORT listener like the router's, upstream keep-alive with a per-connection
# request cap (keepalive_requests) high enough that it never reconnects during a run.
write_nginx() { # N port upstream-port
    local n=$1 port=$2 up=$3
    {
        echo "worker_processes 2; pid $W/nginx.pid; error_log $W/nginx-error.log warn; daemon on;"
        echo "events { worker_connections 4096; }"
        echo "http { access_log off; keepalive_requests 100000;"
        echo "  map_hash_max_size 4194304; map_hash_bucket_size 128;"
        for c in 0 1 2 3; do
            echo "  upstream cell$c { server 127.0.0.1:$up; keepalive 64; keepalive_requests 100000; keepalive_timeout 60s; }"
        done
        echo "  map \$http_x_tenant_env \$tenant_env { default \$http_x_tenant_env; \"\" prod; }"
        echo "  map \$host \$tenant { ~^(?<t>[a-z][a-z0-9-]+)\\.localhost\$ \$t; }"
        echo "  map \$host \$cell { hostnames; default \"\"; include $W/nginx-map.conf; }"
        echo "  server { listen 127.0.0.1:$port reuseport;"
        echo "    location / { if (\$cell = \"\") { return 404; }"
        echo "      proxy_http_version 1.1; proxy_set_header Connection \"\";"
        echo "      proxy_set_header X-Tenant-ID \$tenant; proxy_set_header X-Tenant-Env \$tenant_env;"
        echo "      proxy_set_header X-Correlation-ID \$request_id; proxy_pass http://\$cell; } }"
        echo "}"
    } > "$W/nginx.conf"
    python3 - "$n" "$W/nginx-map.conf" <<'PY'
import sys
n, path = int(sys.argv[1]), sys.argv[2]
with open(path, "w") as f:
    for i in range(n):
        f.write(f"t{i}.localhost cell{i % 4};\n")
PY
    if [ -f "$W/nginx.pid" ] && kill -0 "$(cat "$W/nginx.pid")" 2>/dev/null; then
        # A reload with a reuseport listener keeps the old workers' sockets until they
        # exit; restart instead so every run starts from the same two workers.
        kill "$(cat "$W/nginx.pid")"
        for _ in $(seq 1 100); do kill -0 "$(cat "$W/nginx.pid" 2>/dev/null)" 2>/dev/null || break; sleep 0.1; done
    fi
    nginx -c "$W/nginx.conf"
    sleep 1
}

# CPU seconds (utime + stime, all threads) of a process and its children processes.
cpu_ticks() { # pid...
    local total=0 p
    for p in "$@"; do
        # Fields 14 and 15 of /proc/PID/stat, after the parenthesised command name.
        total=$((total + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
    done
    echo "$total"
}
nginx_pids() { local m; m=$(cat "$W/nginx.pid"); echo "$m $(pgrep -P "$m" | tr '\n' ' ')"; }
