# Sourced by the daemon benches (benches/backlog_memory.sh, benches/memory_at_scale.sh): installs
# what is missing, builds the release binary, starts tansu on 127.0.0.1 with in-memory storage,
# points the daemon at it (a fresh store in $WORK, HTTP on a free port) and creates the topics.
# Sets WORK, PORT, HTTP, TANSU and B (the binary: BIN when given, for builds run alternately, and
# then nothing is built); the exit trap stops $DAEMON (when the bench set it) and tansu, and
# removes $WORK.
bash .ci/setup >/dev/null
export LIBTORCH="$PWD/.venv/lib/python3.11/site-packages/torch"
export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[ -n "${BIN:-}" ] || cargo build --release --locked --bin twhin-stream
WORK=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
HTTP=$(free_port)
.cache/bin/tansu broker --listener-url tcp://127.0.0.1:$PORT --advertised-listener-url tcp://127.0.0.1:$PORT \
  --storage-engine memory://tansu/ > "$WORK/tansu.log" 2>&1 &
TANSU=$!
DAEMON=
trap 'kill $DAEMON $TANSU 2>/dev/null || true; rm -rf "$WORK"' EXIT
sleep 1
export TWHIN_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:$PORT TWHIN_STORAGE__PATH=$WORK/store TWHIN_HTTP__BIND=127.0.0.1:$HTTP
export TWHIN_KAFKA__CONSUMER__SESSION_TIMEOUT_MS=6000 TWHIN_LOG__LEVEL=${TWHIN_LOG__LEVEL:-warn}
B=${BIN:-target/release/twhin-stream}
$B topics apply >/dev/null
