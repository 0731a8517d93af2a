"""A Python subscriber of twhin-stream's versions that applies them whole (topics/README.md).

Reads the embeddings and versions topics from the beginning (read_committed), groups rows by
their (version, epoch) attempt, and applies a version only when its marker is in and exactly
marker["rows"] distinct keys of that attempt are (contract 2). Versions apply in order (each
carries only the rows that changed), each on the attempt its marker names (`builds_on`); a newer
whole attempt of the applied version (a retry after a lost acknowledgement) is applied over it.
The table it prints is what `twhin-stream export` writes for that version.

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


CONTRACT = 2  # the version of topics/README.md's contract this subscriber follows


class Versions:
    def __init__(self):
        # applied: the (version, epoch) held, (0, 0) before the first; pending: (v, e) -> [rows, marker]
        self.applied, self.table, self.pending = (0, 0), {}, {}
        self.codebooks = {}  # epoch -> centroids [m, 256, D/m]

    @property
    def version(self):
        return self.applied[0]

    def row(self, key, version, epoch, vector):  # vector None: the node was erased
        if (version, epoch) > self.applied:  # older attempts are stale
            self.pending.setdefault((version, epoch), [{}, None])[0][key] = vector
            self.advance()

    def marker(self, m):
        if m.get("contract", 1) > CONTRACT:
            raise SystemExit(f"version marker of contract {m['contract']}: this subscriber "
                             f"implements contract {CONTRACT}; upgrade it")
        if (m["version"], m["epoch"]) > self.applied:
            self.pending.setdefault((m["version"], m["epoch"]), [{}, None])[1] = m
            self.advance()

    def whole(self, attempt):
        rows, m = self.pending[attempt]
        return m is not None and m["rows"] == len(rows)

    def next_in_line(self):
        """A newer whole attempt of the applied version (its retry, carrying every key the applied
        one did), else the newest whole attempt of the next version built on the applied one."""
        v, e = self.applied
        retries = [k for k in self.pending if k[0] == v and k[1] > e and self.whole(k)]
        held = {"version": v, "epoch": e}
        following = [k for k in self.pending if k[0] == v + 1 and self.whole(k)
                     and self.pending[k][1].get("builds_on") in (None, held)]
        return max(retries or following, default=None)

    def advance(self):
        while (key := self.next_in_line()) is not None:
            rows = self.pending.pop(key)[0]
            for k, v in rows.items():  # codebooks first: the coded rows beside them need them
                if isinstance(v, tuple) and v[0] == "codebooks":
                    self.codebooks[v[1]] = v[2]
            for k, v in rows.items():
                if isinstance(v, tuple) and v[0] == "codes":
                    centroids = self.codebooks[v[1]]
                    v = np.concatenate([centroids[np.arange(len(v[2])), v[2]].ravel(), v[3]])
                if k.startswith("codebooks:"):
                    if v is None:  # retired: no row names them any more
                        self.codebooks.pop(int(k.split(":", 1)[1]), None)
                elif v is None:
                    self.table.pop(k, None)
                else:
                    self.table[k] = v
            self.applied = key
            self.pending = {k: v for k, v in self.pending.items() if k > key}
            nodes = sum(not k.startswith("relation:") for k in self.table)
            print(json.dumps({"applied": key[0], "epoch": key[1], "nodes": nodes}))


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
            versions.row(m.key().decode(), *tombstone_attempt(m.headers()), None)
        else:
            versions.row(m.key().decode(), *decode_row(m.value()))
    consumer.close()
    # The sum of every value held: a check that rows (coded ones too) decode as `export` does.
    checksum = sum(float(np.sum(v, dtype=np.float64)) for v in versions.table.values())
    print(json.dumps({"version": versions.version, "keys": len(versions.table),
                      "checksum": checksum}))


if __name__ == "__main__":
    main()
