#!/usr/bin/env bash
# How long a lost store takes to come back from its changelog (issue 24, item 4): tansu on
# 127.0.0.1, the synthetic TwHIN stream (NODES, EDGES: default 1,000,000 / 10,000,000), ingested by
# the daemon with training and publishing off (this measures the store), stopped;
# the store folder deleted; the daemon started again. Prints, as one JSON line: the events and
# edges, the ingest rate of the first run, the restore's records, events, edges appended and
# seconds (`/v1/status` `ingest.restored`), the seconds from the second start to `/v1/status`
# answering, and whether the restored store's figures equal the first run's.
#   bash benches/restore.sh
#   NODES=100000 EDGES=1000000 bash benches/restore.sh        # a quick one
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=${NODES:-1000000} EDGES=${EDGES:-10000000}
source benches/daemon_env.sh
export TWHIN_TRAINER__ENABLED=false TWHIN_PUBLISH__ENABLED=false
$B replay synthetic --nodes "$NODES" --edges "$EDGES" --json | tail -1 >&2
python3 - "$B" "$HTTP" "$EDGES" "$WORK" <<'PY'
import json, shutil, subprocess, sys, time, urllib.request
b, port, total, work = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
store = f"{work}/store"
def status():
    try:
        return json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=5))
    except Exception:
        return None
def start(log):
    return subprocess.Popen([b, "run"], stdout=open(log, "w"), stderr=subprocess.STDOUT)
def stop(p):
    p.terminate()
    p.wait(timeout=300)
def fail(msg, log):
    print(msg, file=sys.stderr)
    print(open(log, errors="replace").read()[-4000:], file=sys.stderr)
    sys.exit(1)

log1 = f"{work}/first.log"
p = start(log1)
t0 = time.time(); first = None
while True:
    s = status()
    if p.poll() is not None: fail("the first daemon exited", log1)
    if s and s["ingest"]["consumed"] > 0 and first is None: first = (time.time(), s["ingest"]["consumed"])
    if s and s["ingest"]["consumed"] >= total and s["kafka"]["lag"] == 0: break
    if s: print(f"[restore] ingest {time.time()-t0:6.0f} s  consumed {s['ingest']['consumed']:>9}", file=sys.stderr)
    if time.time() - t0 > 3600: fail("not ingested within an hour", log1)
    time.sleep(2)
ingest_rate = (s["ingest"]["consumed"] - first[1]) / max(time.time() - first[0], 1e-9)
before = s["store"]
stop(p)
shutil.rmtree(store)
log2 = f"{work}/second.log"
t1 = time.time()
p = start(log2)
while True:
    s = status()
    if p.poll() is not None: fail("the second daemon exited", log2)
    if s is not None: break
    if time.time() - t1 > 3600: fail("no status within an hour of the second start", log2)
    time.sleep(0.2)
answering = time.time() - t1
restored = s["ingest"]["restored"]
same = all(s["store"][k] == before[k] for k in ["nodes", "edges", "edges_total", "edges_deleted", "nodes_erased", "offsets"])
stop(p)
print(json.dumps({"nodes": sum(before["nodes"].values()), "edges": before["edges_total"],
                  "events": total, "ingest_events_per_s": round(ingest_rate),
                  "restored": restored, "restore_events_per_s": round(restored["events"] / max(restored["seconds"], 1e-9)),
                  "second_start_to_status_s": round(answering, 2), "store_as_before": same}))
PY
