#!/usr/bin/env bash
# Run the Autobahn|Testsuite fuzzingclient (cases 1.* - 10.*; no 12.*/13.*,
# compression is not supported) against `wschat --echo` on 127.0.0.1.
#
# Usage: tests/autobahn/run.sh [--no-build] [--cases '1.*,5.1']
#
# Environment:
#   AUTOBAHN_HOME     where the suite is installed (default /tmp/wschat-autobahn);
#                     installed from PyPI on first use (pinned, requirements-py27.txt)
#   AUTOBAHN_PYTHON2  Python 2.7 interpreter to build the venv from
#                     (default: pyenv's 2.7.x, else python2.7 on PATH)
#   CARGO_TARGET_DIR  honoured for the build; the binary is $CARGO_TARGET_DIR/release/wschat
#                     and the report goes to $CARGO_TARGET_DIR/autobahn (default target/)
#   WSCHAT_BIN        use this server binary instead of building (implies --no-build)
#   AUTOBAHN_CASES    comma-separated case patterns overriding the spec (same as --cases)
#   AUTOBAHN_TIMEOUT  wall-clock limit in seconds for the suite run (default 1200)
#   AUTOBAHN_REPORT_DIR  report/log directory (default $CARGO_TARGET_DIR/autobahn or target/autobahn)
#
# Exit status: 0 if no case FAILED (and every case produced a result),
# 1 if any case FAILED / is missing / the server died, 2 on setup errors.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
AUTOBAHN_HOME="${AUTOBAHN_HOME:-/tmp/wschat-autobahn}"
VENV="$AUTOBAHN_HOME/venv2"
WSTEST="$VENV/bin/wstest"
SUITE_VERSION="25.10.1"
TIMEOUT="${AUTOBAHN_TIMEOUT:-1200}"
MAX_MSG=16777216

BUILD=1
CASES="${AUTOBAHN_CASES:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) BUILD=0 ;;
        --cases) CASES="$2"; shift ;;
        --cases=*) CASES="${1#--cases=}" ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

log() { echo "[autobahn] $*" >&2; }
die() { echo "[autobahn] ERROR: $*" >&2; exit 2; }

# ---------------------------------------------------------------- install
find_python2() {
    if [ -n "${AUTOBAHN_PYTHON2:-}" ]; then echo "$AUTOBAHN_PYTHON2"; return; fi
    local root cand
    root="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
    for cand in "$root"/versions/2.7*/bin/python2.7; do
        [ -x "$cand" ] && { echo "$cand"; return; }
    done
    command -v python2.7 || true
}

suite_ok() {
    [ -x "$WSTEST" ] && "$WSTEST" -a 2>/dev/null | grep -q "AutobahnTestSuite $SUITE_VERSION"
}

install_suite() {
    local py2
    py2="$(find_python2)"
    [ -n "$py2" ] || die "no Python 2.7 found (autobahntestsuite is Python 2 only); set AUTOBAHN_PYTHON2"
    log "installing Autobahn|Testsuite $SUITE_VERSION into $VENV (python2: $py2)"
    mkdir -p "$AUTOBAHN_HOME"
    rm -rf "$VENV"
    # virtualenv 20.21.x is the last release that can create Python 2.7 envs;
    # it runs from a small Python 3 venv.
    if [ ! -x "$AUTOBAHN_HOME/bootstrap/bin/virtualenv" ]; then
        python3 -m venv "$AUTOBAHN_HOME/bootstrap"
        timeout 600 "$AUTOBAHN_HOME/bootstrap/bin/pip" install -q --disable-pip-version-check \
            virtualenv==20.21.1
    fi
    VIRTUALENV_OVERRIDE_APP_DATA="$AUTOBAHN_HOME/virtualenv-appdata" \
        timeout 300 "$AUTOBAHN_HOME/bootstrap/bin/virtualenv" -q --no-download -p "$py2" "$VENV"
    timeout 900 "$VENV/bin/pip" install -q --disable-pip-version-check --no-python-version-warning \
        -r "$HERE/requirements-py27.txt"
    suite_ok || die "installation finished but '$WSTEST -a' does not report $SUITE_VERSION"
}

suite_ok || install_suite
log "$("$WSTEST" -a 2>/dev/null | tr '\n' ' ')"

# ---------------------------------------------------------------- build
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$REPO/$TARGET_DIR" ;; esac
if [ -n "${WSCHAT_BIN:-}" ]; then
    BIN="$WSCHAT_BIN"
    BUILD=0
else
    BIN="$TARGET_DIR/release/wschat"
fi
if [ "$BUILD" = 1 ]; then
    log "cargo build --release (target dir: $TARGET_DIR)"
    (cd "$REPO" && timeout 1800 cargo build --release --bin wschat) || die "cargo build failed"
fi
[ -x "$BIN" ] || die "server binary not found: $BIN"

OUT="${AUTOBAHN_REPORT_DIR:-$TARGET_DIR/autobahn}"
mkdir -p "$OUT"
rm -rf "$OUT/reports"

# ---------------------------------------------------------------- server
SERVER_PID=""
WSTEST_PID=""
cleanup() {
    if [ -n "$WSTEST_PID" ] && kill -0 "$WSTEST_PID" 2>/dev/null; then
        kill "$WSTEST_PID" 2>/dev/null || true
    fi
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$SERVER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')"
SERVER_LOG="$OUT/server.stderr.log"
# The fuzzing client opens hundreds of connections from one address, as
# fast as it can: the per-address limits, made for the internet, are off.
LIMITS_OFF=(--max-connections-per-ip 0 --max-handshakes-per-ip 0)
log "starting $BIN --echo --listen 127.0.0.1:$PORT --max-message-size $MAX_MSG ${LIMITS_OFF[*]}"
"$BIN" --echo --listen "127.0.0.1:$PORT" --max-message-size "$MAX_MSG" "${LIMITS_OFF[@]}" \
    >"$OUT/server.stdout.log" 2>"$SERVER_LOG" </dev/null &
SERVER_PID=$!

ready=0
for _ in $(seq 1 100); do   # up to 10 s
    if grep -q "listening on 127.0.0.1:" "$SERVER_LOG" "$OUT/server.stdout.log" 2>/dev/null; then ready=1; break; fi
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
done
if [ "$ready" != 1 ]; then
    log "server did not report 'listening on 127.0.0.1:PORT'; its stderr:"
    sed 's/^/    /' "$SERVER_LOG" >&2 || true
    die "server failed to start"
fi
# Trust the port the server reports (it may differ if it rewrites the address).
REPORTED="$(cat "$SERVER_LOG" "$OUT/server.stdout.log" | grep -o 'listening on 127\.0\.0\.1:[0-9]*' | head -1 | sed 's/.*://')"
[ -n "$REPORTED" ] && PORT="$REPORTED"
URL="ws://127.0.0.1:$PORT"

# ---------------------------------------------------------------- spec
SPEC="$OUT/fuzzingclient.json"
python3 - "$HERE/fuzzingclient.json" "$SPEC" "$URL" "$OUT/reports/servers" "$CASES" <<'PY'
import json, sys
src, dst, url, outdir, cases = sys.argv[1:6]
spec = json.load(open(src))
assert url.startswith("ws://127.0.0.1:"), url
spec["outdir"] = outdir
for s in spec["servers"]:
    s["url"] = url
if cases.strip():
    spec["cases"] = [c.strip() for c in cases.split(",") if c.strip()]
json.dump(spec, open(dst, "w"), indent=3)
PY

# ---------------------------------------------------------------- run
WSTEST_LOG="$OUT/wstest.log"
log "running fuzzingclient against $URL (limit ${TIMEOUT}s); log: $WSTEST_LOG"
start=$(date +%s)
(cd "$OUT" && exec timeout -k 10 "$TIMEOUT" "$WSTEST" -m fuzzingclient -s "$SPEC") >"$WSTEST_LOG" 2>&1 &
WSTEST_PID=$!
last=$start
while kill -0 "$WSTEST_PID" 2>/dev/null; do
    sleep 1
    now=$(date +%s)
    if [ $((now - last)) -ge 30 ]; then
        last=$now
        alive="alive"; kill -0 "$SERVER_PID" 2>/dev/null || alive="DEAD"
        log "... $((now - start))s elapsed (server $alive)"
    fi
done
set +e
wait "$WSTEST_PID"; WSTEST_RC=$?
set -e
WSTEST_PID=""
ELAPSED=$(( $(date +%s) - start ))
log "fuzzingclient finished in ${ELAPSED}s (exit $WSTEST_RC)"

SERVER_STATUS="running"
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    set +e; wait "$SERVER_PID"; SRC=$?; set -e
    SERVER_STATUS="exited during the run (status $SRC)"
fi

# ---------------------------------------------------------------- summary
set +e
python3 "$HERE/summary.py" --report "$OUT/reports/servers" --wstest-log "$WSTEST_LOG" \
    --wstest-rc "$WSTEST_RC" --server-status "$SERVER_STATUS" --server-log "$SERVER_LOG"
RC=$?
set -e
log "report: $OUT/reports/servers/index.html"
exit "$RC"
