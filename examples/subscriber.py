"""A Python subscriber of twhin-stream's versions that applies them whole (topics/README.md).

Reads the embeddings and versions topics from the beginning (read_committed), groups rows by
their (version, epoch) attempt, and applies a version only when its marker is in and exactly
marker["rows"] distinct keys of that attempt are; versions apply in order (each carries only the
rows that changed). The table it prints is what `twhin-stream export` writes for that version.

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


class Versions:
    def __init__(self):
        self.version, self.table, self.pending = 0, {}, {}  # pending: (v, e) -> [rows, marker]
        self.codebooks = {}  # epoch -> centroids [m, 256, D/m]

    def row(self, key, version, epoch, vector):  # vector None: the node was erased
        if version > self.version:
            self.pending.setdefault((version, epoch), [{}, None])[0][key] = vector
            self.advance()

    def marker(self, m):
        if m["version"] > self.version:
            self.pending.setdefault((m["version"], m["epoch"]), [{}, None])[1] = m
            self.advance()

    def advance(self):
        while True:
            whole = [k for k, (rows, m) in self.pending.items()
                     if k[0] == self.version + 1 and m is not None and m["rows"] == len(rows)]
            if not whole:
                return
            key = max(whole)  # of two whole attempts, the later epoch is the adopted one
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
            self.version = key[0]
            self.pending = {k: v for k, v in self.pending.items() if k[0] > self.version}
            nodes = sum(not k.startswith("relation:") for k in self.table)
            print(json.dumps({"applied": self.version, "epoch": key[1], "nodes": nodes}))


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
