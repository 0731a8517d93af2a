"""Rank held-out events against a served table, as a subscriber would (benches/scale_out.sh
SERVED=1).

    python3 benches/served_eval.py DATA EXPORT [--every K] [--comparator dot|cos|l2]

DATA holds the synthetic stream's train.tsv, valid.tsv and test.tsv (`twhin-stream synthetic`);
the daemons were given train and valid only. EXPORT is what `twhin-stream export` wrote from
the topics once they had trained and published them: every owner's rows, assembled as any
subscriber assembles them. Every K-th test event (default 20) is ranked on its target side:
its target among every exported row of the target's type, scored against the source's
exported row translated by the relation's, the source's other targets of that relation in any
split filtered out, ties counted as half (the daemon's realistic rank). An event whose source
or target has no exported row is counted as unranked. Prints one JSON line.
"""

import argparse
import json
import os
import sys

import numpy as np


def load_export(path):
    meta = json.load(open(os.path.join(path, "meta.json")))
    tables = {}
    for name, t in meta["types"].items():
        ids = open(os.path.join(path, f"{name}.ids")).read().split("\n")[: t["rows"]]
        tables[name] = (np.load(os.path.join(path, f"{name}.npy")), {k: i for i, k in enumerate(ids)})
    rel_ids = open(os.path.join(path, "relations.ids")).read().split("\n")[: meta["relations"]["rows"]]
    relations = np.load(os.path.join(path, "relations.npy"))
    return meta, tables, {k: relations[i] for i, k in enumerate(rel_ids)}


def read_events(path):
    with open(path) as f:
        for line in f:
            src, rel, dst = line.rstrip("\n").split("\t")[:3]
            yield src, rel, dst


def split_key(key):
    node_type, node_id = key.split(":", 1)
    return node_type, node_id


def scores(comparator, queries, candidates):
    if comparator == "dot":
        return queries @ candidates.T
    if comparator == "cos":
        q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        c = candidates / np.maximum(np.linalg.norm(candidates, axis=1, keepdims=True), 1e-12)
        return q @ c.T
    if comparator == "l2":
        d2 = (queries**2).sum(1)[:, None] + (candidates**2).sum(1)[None, :] - 2 * queries @ candidates.T
        return -np.sqrt(np.maximum(d2, 0))
    sys.exit(f"--comparator {comparator}: dot, cos or l2")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("export")
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--comparator", default="dot")
    args = ap.parse_args()
    meta, tables, relations = load_export(args.export)
    dim = meta["relations"]["dim"]
    known = {}
    for split in ("train", "valid", "test"):
        for src, rel, dst in read_events(os.path.join(args.data, f"{split}.tsv")):
            known.setdefault((src, rel), set()).add(dst)
    by_type = {}
    sampled = unranked = 0
    for k, (src, rel, dst) in enumerate(read_events(os.path.join(args.data, "test.tsv"))):
        if k % args.every:
            continue
        sampled += 1
        (st, si), (dt, di) = split_key(src), split_key(dst)
        s_table, d_table = tables.get(st), tables.get(dt)
        if s_table is None or d_table is None or si not in s_table[1] or di not in d_table[1] or rel not in relations:
            unranked += 1
            continue
        query = s_table[0][s_table[1][si]][:dim] + relations[rel]
        others = [d_table[1][i] for _, i in map(split_key, known[(src, rel)] - {dst})
                  if i in d_table[1]]
        by_type.setdefault(dt, []).append((query, d_table[1][di], others))
    ranks = []
    for dt, queries in by_type.items():
        table = tables[dt][0]
        rows, bias = table[:, :dim], (table[:, dim] if table.shape[1] > dim else None)
        for start in range(0, len(queries), 256):
            part = queries[start:start + 256]
            s = scores(args.comparator, np.stack([q for q, _, _ in part]), rows).astype(np.float64)
            if bias is not None:
                s += bias[None, :]
            truth = s[np.arange(len(part)), [t for _, t, _ in part]]
            for row, (_, _, others) in enumerate(part):
                s[row, others] = -np.inf
            higher = (s > truth[:, None]).sum(1)
            at_least = (s >= truth[:, None]).sum(1)
            ranks.extend(((higher + 1 + at_least) / 2).tolist())
    ranks = np.asarray(ranks, dtype=np.float64)
    n = max(len(ranks), 1)
    print(json.dumps({
        "sampled": sampled, "ranked": len(ranks), "unranked": unranked,
        "hits@10": round(float((ranks <= 10).sum() / n), 4),
        "mrr": round(float((1.0 / ranks).sum() / n), 4) if len(ranks) else 0.0,
        "version": meta["version"], "rows": {t: v["rows"] for t, v in meta["types"].items()},
    }))


if __name__ == "__main__":
    main()
