"""A Python subscriber of twhin-stream's versions that applies them whole (topics/README.md).

Reads the embeddings and versions topics from the beginning (read_committed) and groups records
by their (version, epoch) attempt and the partition they were read from. Contract 3: a marker
with "partition": q covers partition q of the embeddings topic (each partition's owner publishes
its own chain); one without covers the whole topic (contracts 1 and 2, the legacy scope). An
attempt is whole in a scope when its marker is in and exactly marker["rows"] distinct keys of the
attempt were read from that partition (legacy: from every partition). Per scope, versions apply
in order (each carries only the rows that changed), each on the attempt its marker names
(`builds_on`); a partition also takes a base (`builds_on` null, every row of the partition) at
any higher version, and continues the legacy chain after a publisher's upgrade. A newer whole
attempt of the held version (a retry after a lost acknowledgement) is applied over it. Codebooks
are held per partition. The table it prints is what `twhin-stream export` writes.

    pip install confluent-kafka numpy
    python examples/subscriber.py --bootstrap-servers 127.0.0.1:9092 --idle-exit-secs 10

A late start on compacted topics needs the catch-up of `twhin_stream::subscriber` (not here).
"""

import argparse
import json
import struct
import time

import numpy as np
from confluent_kafka import Consumer, TopicPartition

def decode_row(value):
    """(version, epoch, what): a vector, or for publish.format = "pq" a coded row
    ("codes", codebooks epoch, codes, extra values) or codebooks ("codebooks", epoch, centroids
    [m, 256, D/m])."""
    if value.startswith(b"TWE1"):  # publish.format = "f32le"
        version, epoch, ts, dim = struct.unpack_from("<QQqI", value, 4)
        return version, epoch, np.frombuffer(value, "<f4", dim, 32)
    if value.startswith(b"TWQ1"):
        version, epoch, ts, books, m, extra = struct.unpack_from("<QQqQHH", value, 4)
        codes = np.frombuffer(value, np.uint8, m, 40)
        return version, epoch, ("codes", books, codes, np.frombuffer(value, "<f4", extra, 40 + m))
    if value.startswith(b"TWC1"):
        version, epoch, books, m, k, d = struct.unpack_from("<QQQIII", value, 4)
        return version, epoch, ("codebooks", books, np.frombuffer(value, "<f4", m * k * d, 40)
                                .reshape(m, k, d))
    row = json.loads(value)
    return row["version"], row["epoch"], np.asarray(row["vector"], "<f4")


def tombstone_attempt(headers):
    h = dict(headers or [])
    return int(h["twhin-version"]), int(h["twhin-epoch"])


CONTRACT = 3  # the version of topics/README.md's contract this subscriber follows


class Versions:
    """Whole versions per scope: None, the whole topic (contract 1 and 2 markers); q, partition q
    of the embeddings topic (contract 3 markers, `"partition": q`)."""

    def __init__(self):
        self.held = {}  # scope -> the (version, epoch) it holds
        self.table = {}
        self.versions = {}  # key -> the version that carried its row
        self.legacy_seen = None  # the newest legacy (contract 1 or 2) marker read
        # (version, epoch) -> ({partition: {key: record}}, {scope: marker})
        self.pending = {}
        self.codebooks = {}  # (scope, epoch) -> centroids [m, 256, D/m]

    @property
    def version(self):  # the highest version applied in any scope
        return max(self.held.values(), default=(0, 0))[0]

    def effective(self, scope):
        """The attempt a scope builds on: its own, else (a partition) the legacy scope's, which
        a publisher upgraded from contract 2 continues."""
        if scope in self.held:
            return self.held[scope]
        return self.held.get(None) if scope is not None else None

    def legacy_open(self):
        """A legacy marker was read that the legacy scope has not applied: records at or below
        a partition's held attempt may still be its (a base can apply before the legacy version
        under it)."""
        held = self.held.get(None)
        return self.legacy_seen is not None and (held is None or held < self.legacy_seen)

    def not_newer(self, scope, attempt):
        held = self.effective(scope)
        return held is not None and attempt <= held

    def stale_record(self, partition, attempt):
        legacy = self.held.get(None)
        return self.not_newer(partition, attempt) and (
            not self.legacy_open() or (legacy is not None and attempt <= legacy))

    def row(self, partition, key, version, epoch, record):  # record None: the node was erased
        if self.stale_record(partition, (version, epoch)):  # stale in its partition
            return
        rows, _ = self.pending.setdefault((version, epoch), ({}, {}))
        rows.setdefault(partition, {})[key] = record
        self.advance([None, partition])

    def marker(self, m):
        if m.get("contract", 1) > CONTRACT:
            raise SystemExit(f"version marker of contract {m['contract']}: this subscriber "
                             f"implements contract {CONTRACT}; upgrade it")
        scope, attempt = m.get("partition"), (m["version"], m["epoch"])
        if scope is None:
            self.legacy_seen = max(self.legacy_seen or attempt, attempt)
        if self.not_newer(scope, attempt):
            return
        self.pending.setdefault(attempt, ({}, {}))[1][scope] = m
        self.advance([scope])

    def whole(self, attempt, scope):
        """The scope's marker is in with exactly its count of distinct keys: those read from its
        partition, or (the legacy scope) from every partition."""
        rows, markers = self.pending[attempt]
        m = markers.get(scope)
        keys = (len(rows.get(scope, {})) if scope is not None
                else sum(len(r) for r in rows.values()))
        return m is not None and m["rows"] == keys

    def next_in_line(self, scope):
        """A newer whole attempt of the held version (its retry, carrying every key the held one
        did); else, legacy: the newest whole attempt of the next version built on the held one;
        a partition: the lowest version above the held one (numbers may skip), newest epoch,
        built on the held attempt or on none (a base, carrying every row of the partition)."""
        held = self.effective(scope)
        whole = sorted(k for k in self.pending if self.whole(k, scope))
        if held is not None:
            retries = [k for k in whole if k[0] == held[0] and k[1] > held[1]]
            if retries:
                return retries[-1]
        ref = None if held is None else {"version": held[0], "epoch": held[1]}
        following = 1 if held is None else held[0] + 1
        follows = [k for k in whole if self.pending[k][1][scope].get("builds_on") in (None, ref)
                   and (k[0] == following if scope is None else k[0] >= following)]
        return max((k for k in follows if k[0] == follows[0][0]), default=None)

    def advance(self, scopes):
        work = set(scopes)
        while work:
            scope = min(work, key=lambda s: (s is not None, s or 0))  # legacy first
            work.discard(scope)
            attempt = self.next_in_line(scope)
            if attempt is None:
                continue
            self.apply(scope, attempt)
            work.add(scope)
            if scope is None:  # partitions that continue the legacy chain may follow now
                work |= {s for _, markers in self.pending.values() for s in markers
                         if s is not None and s not in self.held}

    def apply(self, scope, attempt):
        rows, markers = self.pending[attempt]
        del markers[scope]
        if scope is None:
            records = [r for part in rows.values() for r in part.items()]
            rows.clear()
        else:
            records = list(rows.pop(scope, {}).items())
        if not rows and not markers:
            del self.pending[attempt]
        self.merge(scope, attempt[0], records)
        self.held[scope] = attempt
        self.prune()
        # relation vectors (relation:<name>) and each partition's share of them
        # (relation-delta:<p>, which a subscriber that does not train needs not read) are not nodes
        nodes = sum(not k.startswith(("relation:", "relation-delta:")) for k in self.table)
        print(json.dumps({"applied": attempt[0], "epoch": attempt[1], "partition": scope,
                          "nodes": nodes}))

    def merge(self, scope, version, records):
        for k, v in records:  # codebooks first: the coded rows beside them need them
            if isinstance(v, tuple) and v[0] == "codebooks":
                self.codebooks[(scope, v[1])] = v[2]
        retired = []
        for k, v in records:
            if isinstance(v, tuple) and v[0] == "codebooks":
                continue
            if isinstance(v, tuple) and v[0] == "codes":  # its partition's copy, else legacy's
                centroids = self.codebooks.get((scope, v[1]), self.codebooks.get((None, v[1])))
                v = (None if centroids is None else
                     np.concatenate([centroids[np.arange(len(v[2])), v[2]].ravel(), v[3]]))
            if k.startswith("codebooks:"):
                if v is None:  # retired in this scope: no row of it names them any more
                    retired.append((scope, int(k.split(":", 1)[1])))
            elif self.versions.get(k, 0) > version:
                continue  # never back to an older version's row (a legacy one applied late)
            elif v is None:  # erased (or undecodable: left out)
                self.table.pop(k, None)
                self.versions.pop(k, None)
            else:
                self.table[k] = v
                self.versions[k] = version
        for key in retired:
            self.codebooks.pop(key, None)

    def prune(self):
        """Drop records and markers of attempts not newer than what their scope holds."""
        for attempt in list(self.pending):
            rows, markers = self.pending[attempt]
            for q in [q for q in rows if self.stale_record(q, attempt)]:
                del rows[q]
            for s in [s for s in markers if self.not_newer(s, attempt)]:
                del markers[s]
            if not rows and not markers:
                del self.pending[attempt]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    ap.add_argument("--embeddings-topic", default="twhin.embeddings")
    ap.add_argument("--versions-topic", default="twhin.versions")
    ap.add_argument("--idle-exit-secs", type=float, default=30)
    args = ap.parse_args()
    consumer = Consumer({"bootstrap.servers": args.bootstrap_servers,
                         "group.id": "twhin-python-subscriber", "enable.auto.commit": False,
                         "isolation.level": "read_committed"})
    parts = []
    for topic in (args.embeddings_topic, args.versions_topic):
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        parts += [TopicPartition(topic, p, 0) for p in meta.partitions]  # 0: the beginning
    consumer.assign(parts)
    versions, last = Versions(), time.monotonic()
    while time.monotonic() - last < args.idle_exit_secs:
        m = consumer.poll(0.5)
        if m is None or m.error():
            continue
        last = time.monotonic()
        if m.topic() == args.versions_topic:
            versions.marker(json.loads(m.value()))
        elif m.value() is None:
            versions.row(m.partition(), m.key().decode(), *tombstone_attempt(m.headers()), None)
        else:
            versions.row(m.partition(), m.key().decode(), *decode_row(m.value()))
    consumer.close()
    # The sum of every value held: a check that rows (coded ones too) decode as `export` does
    # (which writes node rows and relation vectors, not the partitions' shares of the relations).
    checksum = sum(float(np.sum(v, dtype=np.float64)) for k, v in versions.table.items()
                   if not k.startswith("relation-delta:"))
    print(json.dumps({"version": versions.version, "keys": len(versions.table),
                      "checksum": checksum}))


if __name__ == "__main__":
    main()
