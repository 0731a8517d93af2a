#!/usr/bin/env bash
# Several instances in one consumer group (issue 24): tansu on 127.0.0.1, the synthetic TwHIN
# stream (NODES, EDGES: default 1,000,000 / 10,000,000), `config/default.toml` otherwise. Two
# phases on the same events, each with its own group (so its own changelog and routed topics) and
# its own versions and embeddings topics:
#   N=1  one instance ingests and trains the stream until its trainer has drained it;
#   N=2  two instances, started together, do the same, each storing and training the
#        partitions the group gives it; once both drained, B is SIGKILLed and A takes its
#        partitions back from their changelog (the resume).
# Ingest, the store, training and publication follow the partitions (each instance publishes
# its partitions' versions, contract 3, and serves other owners' rows from its cache of them),
# and with publication on the instances exchange gradients ([remote] exchange_gradients, on by
# default; TWHIN_REMOTE__EXCHANGE_GRADIENTS=false turns it off: each sends the gradients of rows
# the other owns with its versions, and copies the other's published rows over its own copies);
# each instance's figures then add its `exchange` counters.
# PUBLISH=1 publishes in both phases at the defaults (a version every 10 s, the ANN index on),
# and each instance's figures add its versions, the partitions its last version covered, its
# bases and its event-to-publish freshness, the versions the drift gate held and the pull
# strength at the end (`align.held`, `align.pull`), and its cache of the other's rows (`remote`: the
# partitions followed, rows, versions applied, the largest lag seen at the 2 s status polls and
# the apply delay from each version's publication); without it publication is off in both
# phases.
# Prints one JSON line: per phase the seconds from the first event consumed to the last one
# trained, the distinct events trained per second (replayed edges not counted), the live
# prequential Hits@10 and MRR over the last 80% of the stream (every instance's ranks summed
# from when 20% of the stream was trained, read at the 2 s status polls), each instance's
# peak resident memory (MiB) and its store's edges; for the resume, the seconds from B's kill to
# A's new assignment (the group's session timeout, 6 s here, is most of it), the seconds A's
# assignment spent bringing B's partitions up to their changelog, the events it appended, and the
# seconds from the assignment to A's first training step on an edge it took from the changelog.
#   bash benches/scale_out.sh
#   NODES=100000 EDGES=1000000 bash benches/scale_out.sh        # a quick one
#   PUBLISH=1 NODES=100000 EDGES=1000000 bash benches/scale_out.sh
# TRACE_ALIGN=1 prints each instance's pull strength and its last version's drift at every poll.
# SERVED=1 (with PUBLISH=1) writes the stream as a dataset (`twhin-stream synthetic`: 85/5/10% in
# order), replays its train and valid splits only, and once a phase has trained and published
# them adds `served_holdout`: its test split (every 20th event) ranked against what a subscriber
# of the phase's topics holds (`export`: every owner's rows together), the same way at every N
# (benches/served_eval.py). The live figure ranks each instance's own copies of the rows other
# instances own; this one ranks what is served.
# Each phase reports the broker's (tansu's) CPU over it in cores (`broker_cores`), and with
# SERVED=1 what `/v1/neighbors` takes once the stream is trained (`neighbors`: 300 sources of
# test events, the default path and `exact=true`, latency p50/p99 in ms, and at N>1 how many
# answers were gathered from the other owner, its own time, and partitions ranked from copies).
# PERF=DIR samples each instance with `perf record -g` (99 Hz) from the partitions' assignment
# until the stream is trained, into DIR/<phase>-<name>.data (`perf report -i ... --sort
# comm,symbol` shows where each thread's CPU goes).
# CPU: by default the instances share the machine's cores with the broker, with no cap.
# CPU_QUOTA=0.5 gives every instance a cap of half a core (a cgroup v1 `cpu` group of its own,
# `cpu.cfs_quota_us`, joined before the daemon starts so every thread counts), the same at every
# N, so that the broker and the producer keep the rest: the issue's throughput protocol. Each
# instance's figures add the CPU seconds it used, in all and per thread name (`cpu_s_by_thread`:
# ann-index, remote-follower, the trainer's, ...), and with a cap the time it was throttled. CPU_LIST=0
# pins every instance to core 0 instead (one budget per phase). PHASES picks the phases (default
# "1 2"; 3 is three instances, with 3, 3 and 2 partitions, reported as "n3"). The test broker
# keeps every phase's topics in memory: at 1M nodes / 10M events "1 2 3" outgrew 24 GB (tansu
# OOM-killed at 15.5 GB during the third phase), so run `PHASES=3` on its own there.
set -euo pipefail
cd "$(dirname "$0")/.."
NODES=${NODES:-1000000} EDGES=${EDGES:-10000000}
source benches/daemon_env.sh
if [ "${SERVED:-0}" = 1 ]; then
  [ "${PUBLISH:-0}" = 1 ] || { echo "SERVED=1 ranks what was published: set PUBLISH=1" >&2; exit 2; }
  $B synthetic --nodes "$NODES" --edges "$EDGES" --out "$WORK/data" --json | tail -1 >&2
  $B replay --data "$WORK/data" --splits train,valid --json | tail -1 >&2
  STREAM=$(cat "$WORK/data/train.tsv" "$WORK/data/valid.tsv" | wc -l)
else
  $B replay synthetic --nodes "$NODES" --edges "$EDGES" --json | tail -1 >&2
  STREAM=$EDGES
fi
python3 - "$B" "$STREAM" "$WORK" "${CPU_LIST:-}" "$NODES" "${PUBLISH:-0}" "${PHASES:-1 2}" "${SERVED:-0}" "${CPU_QUOTA:-}" "${PERF:-}" "$TANSU" <<'PY'
import json, os, signal, socket, subprocess, sys, time, urllib.request
b, total, work, cpus, nodes = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
publish, phases, served = sys.argv[6] == "1", [int(n) for n in sys.argv[7].split()], sys.argv[8] == "1"
quota = float(sys.argv[9]) if sys.argv[9] else None
perf_dir = sys.argv[10] or None
broker_pid = sys.argv[11]
CGROUP_CPU = "/sys/fs/cgroup/cpu"

def cpu_seconds(stat):
    """utime + stime of a /proc stat file (fields 14 and 15, after the command's ")")."""
    ticks = open(stat).read().rsplit(")", 1)[1].split()[11:13]
    return sum(int(t) for t in ticks) / os.sysconf("SC_CLK_TCK")

class CpuCap:
    """A cgroup v1 `cpu` group of its own, capped at `cores` cores, that a process joins before it
    execs the daemon, so that every thread it starts is counted against the cap."""
    def __init__(self, name, cores):
        self.path = f"{CGROUP_CPU}/twhin-bench-{name}"
        if os.path.isdir(self.path): os.rmdir(self.path)
        os.mkdir(self.path)
        period = int(open(f"{self.path}/cpu.cfs_period_us").read())
        open(f"{self.path}/cpu.cfs_quota_us", "w").write(str(int(cores * period)))
    def wrap(self, cmd):
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *cmd]
    def figures(self):
        stat = dict(l.split() for l in open(f"{self.path}/cpu.stat"))
        return {"throttled_s": round(int(stat["throttled_time"]) / 1e9, 1),
                "periods_throttled": f'{int(stat["nr_throttled"])}/{int(stat["nr_periods"])}'}

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close(); return port

class Instance:
    def __init__(self, phase, name):
        self.name, self.port = f"{phase}-{name}", free_port()
        self.log = f"{work}/{self.name}.log"
        env = dict(os.environ)
        env.update({
            "TWHIN_KAFKA__GROUP_ID": f"bench-{phase}",
            "TWHIN_KAFKA__VERSIONS_TOPIC": f"bench-{phase}.versions",
            "TWHIN_KAFKA__EMBEDDINGS_TOPIC": f"bench-{phase}.embeddings",
            "TWHIN_STORAGE__PATH": f"{work}/{self.name}",
            "TWHIN_HTTP__BIND": f"127.0.0.1:{self.port}",
            "TWHIN_LOG__LEVEL": "info,librdkafka=warn,rdkafka=warn",
            # Both phases pay for the same work: publication on in both, or off in both.
            "TWHIN_PUBLISH__ENABLED": "true" if publish else "false",
        })
        self.env = env
        cmd = [b, "run"] if not cpus else ["taskset", "-c", cpus, b, "run"]
        self.cap = CpuCap(self.name, quota) if quota else None
        if self.cap: cmd = self.cap.wrap(cmd)
        self.p = subprocess.Popen(cmd, env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        self.peak = 0.0
        self.max_lag_ms = 0
    def status(self):
        if self.p.poll() is not None:
            print(open(self.log, errors="replace").read()[-4000:], file=sys.stderr)
            sys.exit(f"{self.name} exited")
        try:
            s = json.load(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/status", timeout=5))
        except Exception:
            return None
        for l in open(f"/proc/{self.p.pid}/status"):
            if l.startswith("VmRSS"):
                self.peak = max(self.peak, int(l.split()[1]) / 1024)
        self.max_lag_ms = max(self.max_lag_ms, (s.get("remote") or {}).get("lag_ms", 0))
        return s
    def cpu(self):
        """The CPU seconds used so far (cumulative, so read once, when a phase's figures are
        taken), in all and per thread name (digits dropped: librdkafka's broker threads, actix's
        workers); threads that ended (an index build's) count only in the total."""
        total = cpu_seconds(f"/proc/{self.p.pid}/stat")
        threads = {}
        for tid in os.listdir(f"/proc/{self.p.pid}/task"):
            try:
                name = open(f"/proc/{self.p.pid}/task/{tid}/comm").read().strip().rstrip("0123456789")
                threads[name] = threads.get(name, 0.0) + cpu_seconds(f"/proc/{self.p.pid}/task/{tid}/stat")
            except OSError:
                pass
        threads["(ended threads)"] = total - sum(threads.values())
        return total, threads

def wait(what, f, timeout=3600, every=1.0):
    t0 = time.time()
    while True:
        r = f()
        if r: return r
        if time.time() - t0 > timeout: sys.exit(f"{what}: not within {timeout} s")
        time.sleep(every)

def phase_env(phase):
    return dict(os.environ, TWHIN_KAFKA__GROUP_ID=f"bench-{phase}",
                TWHIN_KAFKA__VERSIONS_TOPIC=f"bench-{phase}.versions",
                TWHIN_KAFKA__EMBEDDINGS_TOPIC=f"bench-{phase}.embeddings")

def apply_topics(phase):
    subprocess.run([b, "topics", "apply"], env=phase_env(phase), check=True, stdout=subprocess.DEVNULL)

def neighbors_latency(instances, requests=300):
    """`/v1/neighbors` as a client sees it once the phase is trained: the sources of test events
    of `favorites` (k=10, the default path: the index, and at N>1 the other owners asked), then
    the same with `exact=true` (every row this instance holds scored), spread over the
    instances; milliseconds p50/p99 of each, and what the gathered ones asked."""
    sources = []
    for line in open(f"{work}/data/test.tsv"):
        src, rel = line.split("\t")[:2]
        if rel == "favorites" and src not in sources:
            sources.append(src)
            if len(sources) == requests: break
    def timed(query):
        ms, owners_ms, gathered, local = [], [], 0, 0
        for k, src in enumerate(sources):
            t, id_ = src.split(":", 1)
            url = f"http://127.0.0.1:{instances[k % len(instances)].port}/v1/neighbors/{t}/{id_}?rel=favorites&k=10{query}"
            started = time.time()
            try:
                r = json.load(urllib.request.urlopen(url, timeout=10))
            except Exception:
                continue  # a source this instance's store does not hold
            ms.append((time.time() - started) * 1e3)
            g = r.get("gathered")
            if g:
                gathered += 1
                local += len(g["local"])
                owners_ms.extend(o["ms"] for o in g["owners"])
        at = lambda v, p: round(sorted(v)[int((len(v) - 1) * p)], 2) if v else None
        return {"requests": len(ms), "p50_ms": at(ms, 0.5), "p99_ms": at(ms, 0.99), "gathered": gathered,
                "owner_p50_ms": at(owners_ms, 0.5), "partitions_ranked_locally": local}
    return {"default": timed(""), "exact": timed("&exact=true")}

def served_holdout(phase):
    """The test split ranked against the phase's newest whole version, read from its topics as a
    subscriber reads them (`export`), every owner's rows together (benches/served_eval.py)."""
    out = f"{work}/export-{phase}"
    subprocess.run([b, "export", out, "--json"], env=phase_env(phase), check=True, stdout=subprocess.DEVNULL)
    # numpy is in the environment .ci/setup makes.
    r = subprocess.run([".venv/bin/python3", "benches/served_eval.py", f"{work}/data", out],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"benches/served_eval.py failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])

def drained(instances, mark):
    """Every instance's statuses once all events are consumed and every trainer drained. The
    prequential sums of each are kept in `mark` when the first 20% of the stream is trained."""
    ss = [i.status() for i in instances]
    if any(s is None for s in ss): return None
    if not mark and sum(s["trainer"]["edges_trained"] for s in ss) >= total // 5:
        mark.extend(s["trainer"]["prequential"]["totals"] for s in ss)
    consumed = sum(s["ingest"]["consumed"] for s in ss)
    lag = sum(s["kafka"]["lag"] for s in ss)
    backlog = sum(s["trainer"]["backlog"] for s in ss)
    msg = "  ".join(f"{i.name} consumed {s['ingest']['consumed']} trained {s['trainer']['edges_trained']} backlog {s['trainer']['backlog']} rss {i.peak:.0f}" for i, s in zip(instances, ss))
    print(f"[scale-out] {msg}", file=sys.stderr)
    if os.environ.get("TRACE_ALIGN"):
        for i, s in zip(instances, ss):
            last = s["align"].get("last") or {}
            print(f"[align] {i.name} version {s['align'].get('last_version')} pull {s['align']['pull']:.4g} previous {json.dumps(last.get('previous'))}", file=sys.stderr)
    return ss if consumed >= total and lag == 0 and backlog == 0 else None

def phase(n):
    name = f"n{n}"
    apply_topics(name)
    # Started together: whichever joins first may consume alone until the other joins; what it
    # stored of the other's partitions moves with them through the changelog.
    insts = [Instance(name, x) for x in "abc"[:n]]
    all_instances.extend(insts)
    def split():
        ss = [i.status() for i in insts]
        return all(ss) and all(s["kafka"]["assigned_partitions"] > 0 for s in ss) \
            and sum(s["kafka"]["assigned_partitions"] for s in ss) == 8
    wait("the partitions assigned", split, 300, 0.2)
    perfs = []
    if perf_dir:
        os.makedirs(perf_dir, exist_ok=True)
        perfs = [subprocess.Popen(["perf", "record", "-F", "99", "-g", "-p", str(i.p.pid), "-o",
                                   f"{perf_dir}/{i.name}.data"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for i in insts]
    broker_cpu = cpu_seconds(f"/proc/{broker_pid}/stat")
    first = wait("the first event consumed", lambda: any((s := i.status()) and s["ingest"]["consumed"] > 0 for i in insts) and time.time(), 600, 0.1)
    mark = []
    ss = wait("the stream trained", lambda: drained(insts, mark), 7200, 2.0)
    seconds = time.time() - first
    broker_cpu = cpu_seconds(f"/proc/{broker_pid}/stat") - broker_cpu
    for p in perfs:
        p.send_signal(signal.SIGINT)
        p.wait()
    # `edges_trained` counts new edges only (replayed ones are `edges_replayed`).
    fresh = sum(s["trainer"]["edges_trained"] for s in ss)
    # Prequential figures over the last 80% of the stream, every instance's ranks together.
    end = [s["trainer"]["prequential"]["totals"] for s in ss]
    ranked = sum(e["ranked"] - m["ranked"] for e, m in zip(end, mark))
    quality = {"ranked": ranked,
               "hits@10": round(sum(e["hits10"] - m["hits10"] for e, m in zip(end, mark)) / max(ranked, 1), 4),
               "mrr": round(sum(e["reciprocal_ranks"] - m["reciprocal_ranks"] for e, m in zip(end, mark)) / max(ranked, 1), 4)}
    if publish:
        # The last events' version: one more publication interval.
        wait("a version after the stream", lambda: all((s := i.status()) and s["publish"]["committed"] > 0 for i in insts), 300, 1.0)
        time.sleep(12)
        ss = [i.status() for i in insts]
    def figures(i, s):
        f = {"name": i.name, "peak_rss_mib": round(i.peak), "edges": s["store"]["edges_total"],
             "assigned_partitions": s["kafka"]["assigned_partitions"]}
        cpu_s, by_thread = i.cpu()
        f["cpu_s"] = round(cpu_s, 1)
        f["cpu_s_by_thread"] = {k: round(v, 1) for k, v in sorted(by_thread.items(), key=lambda kv: -kv[1]) if v >= 0.5}
        if i.cap: f["cpu_cap"] = i.cap.figures()
        if publish:
            p = s["publish"]
            f.update({"versions": p["committed"], "published_partitions": p["partitions"],
                      "bases": p["bases"], "freshness": p["freshness"],
                      "held": s["align"]["held"], "pull": s["align"]["pull"]})
            r = s.get("remote")
            if r:
                f["remote"] = {"followed": [q["partition"] for q in r["followed"]],
                               "rows": r["rows"], "versions_applied": r["versions_applied"],
                               "lag_ms_max_polled": i.max_lag_ms,
                               "apply_delay_ms": r["apply_delay_ms"]}
            if s.get("exchange"):
                f["exchange"] = s["exchange"]
            if s.get("ann"):
                a = s["ann"]
                f["ann"] = {k: a[k] for k in ("builds", "updates", "rows_updated", "rows_kept", "failures")}
                f["ann"]["rows"] = {t["node_type"]: t["rows"] for t in a["types"]}
        return f
    out = {"seconds": round(seconds, 1), "events_trained_per_s": round(fresh / seconds),
           # The broker's CPU over the phase, in cores: the instances wait on it when it nears
           # what the machine has left them.
           "broker_cores": round(broker_cpu / seconds, 2),
           "prequential_last_80pct": quality,
           "publish": publish, "instances": [figures(i, s) for i, s in zip(insts, ss)]}
    if served:
        out["served_holdout"] = served_holdout(name)
        out["neighbors"] = neighbors_latency(insts)
    return insts, ss, out

def resume_after_a_kill(a, b):
    """B is SIGKILLed; A takes its partitions back from their changelog."""
    before = a.status()
    moved_before = before["ingest"]["moved_in"]
    first_moved_seq = before["store"]["edges_total"]
    killed = time.time()
    b.p.send_signal(signal.SIGKILL); b.p.wait()
    s = wait("A owns every partition again", lambda: (s := a.status()) and s["kafka"]["assigned_partitions"] == 8 and s, 300, 0.1)
    assigned = time.time()
    trained = wait("A trains a moved edge", lambda: (s := a.status()) and s["trainer"]["cursor"] > first_moved_seq and time.time(), 600, 0.1)
    moved = s["ingest"]["moved_in"]
    move_in = moved["seconds"] - moved_before["seconds"]
    # The status counts the partitions once the assignment brought them up to their changelog.
    return {"kill_to_assigned_s": round(assigned - move_in - killed, 2),
            "move_in_s": round(move_in, 2),
            "moved_events": moved["appended"] - moved_before["appended"],
            "assignment_to_first_trained_s": round(trained - assigned + move_in, 2)}

out = {"nodes": nodes, "events": total}
all_instances = []
for n in phases:
    insts, _, out[f"n{n}"] = phase(n)
    # Each phase's figures as soon as it ends, so that a later phase's failure keeps them.
    print(json.dumps({f"n{n}": out[f"n{n}"]}), file=sys.stderr)
    if n == 2:
        out["resume"] = resume_after_a_kill(*insts)
        insts = insts[:1]
    for i in insts: i.p.send_signal(signal.SIGTERM); i.p.wait(timeout=300)
for i in all_instances:
    if i.cap: os.rmdir(i.cap.path)
print(json.dumps(out))
PY
