#!/usr/bin/env bash
# Resident memory of the daemon (tansu on 127.0.0.1, the synthetic stream, NODES/EDGES, default
# 100,000 / 5,000,000) with a 5M-edge training backlog: RSS when ingest has taken the
# whole stream (trainer far behind), and after the backlog has drained.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/daemon_env.sh
$B replay synthetic --nodes ${NODES:-100000} --edges ${EDGES:-5000000} --json | tail -1
$B run > "$WORK/daemon.log" 2>&1 &
DAEMON=$!
python3 - "$HTTP" "$DAEMON" "${EDGES:-5000000}" <<'PY'
import json, sys, time, urllib.request
port, pid, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
def rss():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) // 1024
t0 = time.time(); peak = 0; at_ingested = None
while True:
    try:
        s = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=5))
    except Exception:
        time.sleep(0.5); continue
    r = rss(); peak = max(peak, r)
    c, b = s["ingest"]["consumed"], s["trainer"]["backlog"]
    if at_ingested is None and c >= total:
        at_ingested = (round(time.time()-t0,1), r, b)
        print(json.dumps({"ingested_s": at_ingested[0], "rss_mib": r, "backlog": b}), flush=True)
    if at_ingested and b == 0:
        time.sleep(3); r2 = rss()
        print(json.dumps({"drained_s": round(time.time()-t0,1), "rss_mib": r2, "peak_rss_mib": peak,
                          "rss_growth_mib": r2 - at_ingested[1]}), flush=True)
        break
    if time.time() - t0 > 900: print("timeout", c, b); break
    time.sleep(1)
PY
kill -TERM $DAEMON; wait $DAEMON || true
