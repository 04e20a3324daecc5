#!/usr/bin/env bash
# Cross-node private messages against a single node, side by side in one run:
# starts its own redis-server on a free port (temporary directory) and two
# wschat nodes over it, then for each rate runs `wschat-bench private` with
# both ends on node A, and with senders on A and receivers on B (every
# message crosses Redis). Reports msg/s, latency, and the CPU of node A,
# node B and Redis per message.
#
#   cargo build --release && benches/cluster.sh [RATE...]   (default 2000 10000 30000)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CARGO_TARGET_DIR:-target}/release
rates=("${@:-2000 10000 30000}")
read -r -a rates <<<"${rates[*]}"
duration=${DURATION:-5}
pairs=${PAIRS:-50}

command -v redis-server >/dev/null || { echo "skipped: no redis-server" >&2; exit 0; }
tmp=$(mktemp -d -t wschat-cluster-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$tmp" >/dev/null &
redis_pid=$!; pids+=("$redis_pid")

node() { # name -> starts a node, prints "pid port"
  # The load comes from one address at full speed: no per-client limits.
  "$bin/wschat" --listen 127.0.0.1:0 --data-dir none --log warn \
    --rate-limit 0 --max-handshakes-per-ip 0 --max-connections-per-ip 0 \
    --cluster "redis://127.0.0.1:$rport" 2>"$tmp/$1.log" &
  local pid=$!; pids+=("$pid")
  for _ in $(seq 100); do
    port=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$tmp/$1.log" | head -1)
    [ -n "$port" ] && { echo "$pid $port"; return; }
    sleep 0.05
  done
  echo "node $1 did not start" >&2; cat "$tmp/$1.log" >&2; exit 2
}
# (`node` runs in a subshell here: the parent records the pids for cleanup.)
read -r a_pid a_port < <(node a)
pids+=("$a_pid")
read -r b_pid b_port < <(node b)
pids+=("$b_pid")
sleep 1 # the nodes find each other (hello, rosters)

echo "redis-server $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/'), $(nproc) cores, $pairs pairs, ${duration}s windows"
printf '%-6s %-6s %8s %7s %7s %7s  %-13s %-13s %-13s %s\n' rate mode "msg/s" p50_us p99_us max_us "node A" "node B" "redis" "loadgen"
echo "                                                  (% of a core, µs per message)"
for rate in "${rates[@]}"; do
  for mode in single cross; do
    args=(private --url "ws://127.0.0.1:$a_port/ws" --pairs "$pairs" --rate "$rate"
          --duration "$duration" --warmup 1 --pid "$a_pid" --json)
    if [ "$mode" = cross ]; then
      args+=(--receiver-url "ws://127.0.0.1:$b_port/ws" --receiver-pid "$b_pid" --redis-pid "$redis_pid")
    else
      args+=(--redis-pid "$redis_pid")
    fi
    line=$("$bin/wschat-bench" "${args[@]}" | tail -1) || true
    python3 - "$rate" "$mode" "$line" <<'PY'
import json, sys
rate, mode, line = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    j = json.loads(line)
except Exception:
    print(f"{rate:<7} {mode:<11} (no result: {line[:60]})"); sys.exit()
lat = j.get("latency", {})
per = j.get("delivered_per_s") or 0
def cell(pct):
    if pct is None:
        return "-"
    us = pct / 100 * 1e6 / per if per else 0
    return f"{pct:.0f}% {us:.1f}"
a = cell(j.get("server_cpu_pct"))
b = cell(j.get("receiver_cpu_pct"))
r = cell(j.get("redis_cpu_pct"))
g = cell(j.get("loadgen_cpu_pct"))
print(f"{rate:<6} {mode:<6} {per:>8.0f} {lat.get('p50_us',0):>7.0f} {lat.get('p99_us',0):>7.0f} {lat.get('max_us',0):>7.0f}  {a:<13} {b:<13} {r:<13} {g}")
PY
  done
done
