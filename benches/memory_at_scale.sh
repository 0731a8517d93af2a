#!/usr/bin/env bash
# Resident memory of the daemon at scale against what the model needs (issue 13): tansu on
# 127.0.0.1, the synthetic TwHIN stream (NODES, EDGES: default 1,000,000 / 3,000,000, which reach
# about 999k nodes), `config/default.toml` (dim 128; `TWHIN_TRAIN__DIM` overrides it for the
# daemon and the figure). Prints the RSS before the stream, its peak,
# and after the trainer has drained it and versions went out (SETTLE_S, default 40 s later),
# beside the raw table size (nodes × dim × 4 bytes: one copy of the rows), as one JSON line.
#   bash benches/memory_at_scale.sh
#   NODES=100000 EDGES=300000 bash benches/memory_at_scale.sh        # a quick one
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=${NODES:-1000000} EDGES=${EDGES:-3000000} SETTLE_S=${SETTLE_S:-40}
source benches/daemon_env.sh
$B replay synthetic --nodes "$NODES" --edges "$EDGES" --json | tail -1 >&2
$B run > "$WORK/daemon.log" 2>&1 &
DAEMON=$!
python3 - "$HTTP" "$DAEMON" "$EDGES" "$SETTLE_S" "${TWHIN_TRAIN__DIM:-128}" <<'PY' || { tail -n 30 "$WORK/daemon.log" >&2; exit 1; }
import json, sys, time, urllib.request
port, pid, total, settle, dim = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
def rss_mib():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) / 1024
t0 = time.time(); start = None; peak = 0.0; drained = None; s = None
while True:
    try:
        s = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=5))
    except Exception:
        if time.time() - t0 > 60: sys.exit("the daemon's /v1/status did not answer within 60 s")
        time.sleep(0.5); continue
    r = rss_mib(); peak = max(peak, r); start = start or r
    c, b = s["ingest"]["consumed"], s["trainer"]["backlog"]
    if drained is None and c >= total and b == 0: drained = time.time()
    print(f"[memory] {time.time()-t0:6.0f} s  consumed {c:>9}  backlog {b:>9}  rss {r:7.0f} MiB", file=sys.stderr)
    if drained and time.time() - drained >= settle: break
    if time.time() - t0 > 1800: sys.exit("the trainer did not drain the stream within 30 minutes")
    time.sleep(2)
nodes = sum(s["store"]["nodes"].values())
raw = nodes * dim * 4 / 2**20
after = rss_mib()
print(json.dumps({"nodes": nodes, "edges": s["store"]["edges_total"], "dim": dim,
                  "raw_tables_mib": round(raw, 1), "rss_start_mib": round(start),
                  "rss_peak_mib": round(peak), "rss_after_mib": round(after),
                  "after_over_raw": round(after / raw, 2), "versions": s["publish"]["version"]}))
PY
kill -TERM $DAEMON; wait $DAEMON || true
