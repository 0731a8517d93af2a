#!/usr/bin/env python3
"""Make the built-in datasets' folders from the wheels' raw files (called by .ci/setup).

    python3 .ci/datasets.py DATASETS_DIR

reads DATASETS_DIR/{umls,nations,kinships}/{train,valid,test}.txt (pykeen 1.11.1) and
DATASETS_DIR/ml-100k/ml-100k.{inter,kg,link} (recbole 1.2.1), and writes the folders twhin-stream
loads with `--dataset NAME` (the same as `--data DATASETS_DIR/NAME`):

    DATASETS_DIR/<name>/{train,valid,test}.tsv     head<TAB>relation<TAB>tail[<TAB>ts_ms]

* umls, nations, kinships: one node type each (concept, nation, person), file order kept, no time.
* movielens-100k: the knowledge graph first (stamped with the first rating's time), then the
  ratings in time order (stable: equal times keep file order): rating >= 4 is `rated_high`, <= 3
  `rated_low`, `user:<id> rated_* movie:<item>`. Items linked to a KG entity (ml-100k.link) keep
  their MovieLens id (`movie:<item>`); other KG entities are `entity:<freebase mid>`. Splits by
  time: train = the KG and the first 85% of ratings, valid the next 5%, test the last 10%.

Standard library only; deterministic; each file written whole, then renamed into place.
"""
import os
import sys

KG = {"umls": "concept", "nations": "nation", "kinships": "person"}
SPLITS = ("train", "valid", "test")


def lines(path):
    """Lines as Rust's str::lines() gives them (\\n separated, a trailing \\r dropped)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    out = text.split("\n")
    if out and out[-1] == "":
        out.pop()
    return [l[:-1] if l.endswith("\r") else l for l in out]


def rows(path, n, skip):
    """(line number, fields) of the non-blank lines after `skip` header lines, exactly n fields."""
    out = []
    for i, line in enumerate(lines(path)):
        if i < skip or not line.strip():
            continue
        f = line.split("\t")
        if len(f) != n:
            sys.exit(f"{path}:{i + 1}: expected {n} tab-separated fields, found {len(f)}")
        out.append((i + 1, f))
    return out


def write(path, edges):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for e in edges:
            f.write("\t".join(str(x) for x in e if x is not None) + "\n")
    os.replace(tmp, path)


def kg(root, name, ty):
    src = os.path.join(root, name)
    for split in SPLITS:
        edges = [(f"{ty}:{h}", r, f"{ty}:{t}") for _, (h, r, t) in rows(os.path.join(src, f"{split}.txt"), 3, 0)]
        write(os.path.join(src, f"{split}.tsv"), edges)


def movielens(root):
    raw = os.path.join(root, "ml-100k")
    link = {entity: item for _, (item, entity) in rows(os.path.join(raw, "ml-100k.link"), 2, 1)}

    def node(entity):
        return f"movie:{link[entity]}" if entity in link else f"entity:{entity}"

    ratings = []
    inter = os.path.join(raw, "ml-100k.inter")
    for line, (user, item, rating, ts) in rows(inter, 4, 1):
        try:
            rating, ts = float(rating), int(float(ts)) * 1000
        except ValueError:
            sys.exit(f"{inter}:{line}: rating or timestamp is not a number")
        ratings.append((ts, user, item, rating))
    ratings.sort(key=lambda r: r[0])  # stable
    first_ts = ratings[0][0] if ratings else None
    edges = [(node(h), r, node(t), first_ts) for _, (h, r, t) in rows(os.path.join(raw, "ml-100k.kg"), 3, 1)]
    start = len(edges)
    for ts, user, item, rating in ratings:
        edges.append((f"user:{user}", "rated_high" if rating >= 4.0 else "rated_low", f"movie:{item}", ts))
    n = len(ratings)
    train_end, valid_end = start + n * 85 // 100, start + n * 90 // 100
    out = os.path.join(root, "movielens-100k")
    os.makedirs(out, exist_ok=True)
    write(os.path.join(out, "train.tsv"), edges[:train_end])
    write(os.path.join(out, "valid.tsv"), edges[train_end:valid_end])
    write(os.path.join(out, "test.tsv"), edges[valid_end:])


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "data/datasets"
    for name, ty in KG.items():
        kg(root, name, ty)
    movielens(root)


if __name__ == "__main__":
    main()
