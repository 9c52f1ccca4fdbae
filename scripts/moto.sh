#!/usr/bin/env bash
# Starts or stops a throwaway moto server (an AWS API emulator) on loopback, for the tests
# that apply the `aws` cell template.
#   scripts/moto.sh start DIR [PORT]   prints the server's URL on stdout
#   scripts/moto.sh stop DIR
# moto is installed with pip (`moto[server]`) when `moto_server` is not on PATH.
set -euo pipefail

cmd=${1:?usage: moto.sh start|stop DIR [PORT]}
dir=${2:?usage: moto.sh start|stop DIR [PORT]}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

case "$cmd" in
start)
    if ! command -v moto_server >/dev/null 2>&1; then
        echo "moto.sh: installing moto[server] with pip" >&2
        python3 -m pip install --quiet 'moto[server]>=5' >&2
        hash -r
        if command -v pyenv >/dev/null 2>&1; then pyenv rehash >/dev/null 2>&1 || true; fi
    fi
    if ! command -v moto_server >/dev/null 2>&1; then
        echo "moto.sh: moto_server not found after installing moto[server]" >&2
        exit 1
    fi
    port=${3:-$(free_port)}
    mkdir -p "$dir"
    nohup moto_server -H 127.0.0.1 -p "$port" >"$dir/moto.log" 2>&1 </dev/null &
    echo $! >"$dir/moto.pid"
    for _ in $(seq 1 150); do
        if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/', timeout=1)" 2>/dev/null; then
            echo "http://127.0.0.1:$port"
            exit 0
        fi
        sleep 0.2
    done
    echo "moto.sh: moto_server did not answer on port $port; its log:" >&2
    cat "$dir/moto.log" >&2 || true
    exit 1
    ;;
stop)
    if [ -f "$dir/moto.pid" ]; then
        kill "$(cat "$dir/moto.pid")" 2>/dev/null || true
        rm -f "$dir/moto.pid"
    fi
    ;;
*)
    echo "usage: moto.sh start|stop DIR [PORT]" >&2
    exit 2
    ;;
esac
