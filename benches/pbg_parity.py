#!/usr/bin/env python3
"""The PyTorch-BigGraph side of benches/pbg_parity.sh, and the split both sides train on.

    pbg_parity.py split RAW_ML100K_DIR OUT_DIR [--seed S] [--limit N]
        A seeded random 90/5/5 split of the MovieLens-100k graph as a `--data` folder
        (OUT_DIR/{train,valid,test}.tsv, `head<TAB>relation<TAB>tail`, every node in one type: ids
        without a type prefix): ratings as `u<user> rated_high|rated_low <movie>` (rating >= 4 is
        rated_high), plus the knowledge graph; a movie is its KG entity (ml-100k.link), an
        unlinked movie `i<item>`. Valid/test triples with a node missing from train move to train.
        Prints the counts as JSON.
    pbg_parity.py pbg DATA_DIR WORK_DIR
        Imports the split into PBG's format, trains PBG 1.0 on train.tsv and ranks test.tsv with
        its FilteredRankingEvaluator (all entities, both sides, filtered by train+valid+test,
        pessimistic ties: rank = 1 + negatives scoring >= the positive). Prints JSON: mrr,
        hits@10, train_seconds (PBG's train() call), count. Settings from the environment:
        PBG_EPOCHS (80), PBG_DIM (128), PBG_WORKERS (2), PBG_BATCH (1000), PBG_LR (0.1),
        PBG_BATCH_NEGS (50), PBG_UNIFORM_NEGS (50), PBG_OPERATOR (translation), PBG_LOSS
        (logistic), PBG_INIT (0.001).
"""
import json
import os
import random
import sys
import time
from pathlib import Path


def rows(path, n, skip=1):
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f.read().split("\n")):
            line = line.rstrip("\r")
            if i < skip or not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != n:
                sys.exit(f"{path}:{i + 1}: expected {n} fields, found {len(fields)}")
            out.append(fields)
    return out


def split(raw, out, seed, limit):
    link = {item: entity for item, entity in rows(os.path.join(raw, "ml-100k.link"), 2)}
    movie = lambda item: link.get(item, f"i{item}")
    triples = [tuple(f) for f in rows(os.path.join(raw, "ml-100k.kg"), 3)]
    for user, item, rating, _ts in rows(os.path.join(raw, "ml-100k.inter"), 4):
        rel = "rated_high" if float(rating) >= 4.0 else "rated_low"
        triples.append((f"u{user}", rel, movie(item)))
    rng = random.Random(seed)
    rng.shuffle(triples)
    if limit:
        triples = triples[:limit]
    n = len(triples)
    n_valid = n_test = n * 5 // 100
    train = triples[: n - n_valid - n_test]
    valid = triples[n - n_valid - n_test : n - n_test]
    test = triples[n - n_test :]
    nodes = {x for h, _, t in train for x in (h, t)}
    moved = 0
    kept = {}
    for name, part in (("valid", valid), ("test", test)):
        keep = []
        for h, r, t in part:
            if h in nodes and t in nodes:
                keep.append((h, r, t))
            else:
                train.append((h, r, t))
                nodes.update((h, t))
                moved += 1
        kept[name] = keep
    os.makedirs(out, exist_ok=True)
    for name, part in (("train", train), ("valid", kept["valid"]), ("test", kept["test"])):
        with open(os.path.join(out, f"{name}.tsv"), "w", encoding="utf-8") as f:
            f.writelines(f"{h}\t{r}\t{t}\n" for h, r, t in part)
    print(json.dumps({
        "triples": n, "train": len(train), "valid": len(kept["valid"]), "test": len(kept["test"]),
        "moved_to_train": moved, "entities": len(nodes),
        "relations": len({r for _, r, _ in triples}), "seed": seed,
    }))


def env(name, default, kind=int):
    return kind(os.environ.get(name, default))


def patch_pbg():
    """PBG 1.0's config schema tests `type_ is Optional[arg]`, which Python 3.11's typing no
    longer guarantees (then `to_dict` fails on `Optional[float]`): compare by equality."""
    from typing import Optional
    import torchbiggraph.schema as schema

    def unpack_optional(type_):
        try:
            arg = type_.__args__[0]
        except (AttributeError, LookupError):
            raise TypeError("Not an optional type")
        if type_ != Optional[arg]:
            raise TypeError("Not an optional type")
        return arg

    schema.unpack_optional = unpack_optional


def pbg(data, work):
    patch_pbg()
    import attr
    from torchbiggraph.config import parse_config
    from torchbiggraph.converters.import_from_tsv import convert_input_data
    from torchbiggraph.eval import do_eval_and_report_stats
    from torchbiggraph.filtered_eval import FilteredRankingEvaluator
    from torchbiggraph.train import train
    from torchbiggraph.util import SubprocessInitializer, setup_logging, set_logging_verbosity

    setup_logging()
    edge_paths = [os.path.join(work, f"{s}_partitioned") for s in ("train", "valid", "test")]
    raw = dict(
        entity_path=os.path.join(work, "entities"),
        edge_paths=edge_paths,
        checkpoint_path=os.path.join(work, "model"),
        entities={"all": {"num_partitions": 1}},
        relations=[{"name": "all_edges", "lhs": "all", "rhs": "all",
                    "operator": os.environ.get("PBG_OPERATOR", "translation")}],
        dynamic_relations=True,
        dimension=env("PBG_DIM", 128),
        global_emb=False,
        comparator="dot",
        init_scale=env("PBG_INIT", 0.001, float),
        num_epochs=env("PBG_EPOCHS", 80),
        batch_size=env("PBG_BATCH", 1000),
        num_batch_negs=env("PBG_BATCH_NEGS", 50),
        num_uniform_negs=env("PBG_UNIFORM_NEGS", 50),
        loss_fn=os.environ.get("PBG_LOSS", "logistic"),
        lr=env("PBG_LR", 0.1, float),
        workers=env("PBG_WORKERS", 2),
        eval_fraction=0,
        verbose=0,
    )
    config = parse_config(raw)
    set_logging_verbosity(config.verbose)
    subprocess_init = SubprocessInitializer()
    subprocess_init.register(setup_logging, config.verbose)
    subprocess_init.register(patch_pbg)
    convert_input_data(
        config.entities, config.relations, config.entity_path, config.edge_paths,
        [Path(data) / f"{s}.tsv" for s in ("train", "valid", "test")],
        lhs_col=0, rel_col=1, rhs_col=2, dynamic_relations=config.dynamic_relations,
    )
    started = time.perf_counter()
    train(attr.evolve(config, edge_paths=[edge_paths[0]]), subprocess_init=subprocess_init)
    train_seconds = time.perf_counter() - started
    relations = [attr.evolve(r, all_negs=True) for r in config.relations]
    eval_config = attr.evolve(config, edge_paths=[edge_paths[2]], relations=relations,
                              num_uniform_negs=0)
    stats = None
    for _, _, s in do_eval_and_report_stats(
        eval_config,
        evaluator=FilteredRankingEvaluator(eval_config, [edge_paths[2], edge_paths[1], edge_paths[0]]),
        subprocess_init=subprocess_init,
    ):
        stats = s
    print(json.dumps({
        "mrr": stats.metrics["mrr"], "hits@10": stats.metrics["r10"],
        "train_seconds": train_seconds, "count": stats.count,
        "epochs": config.num_epochs, "workers": config.workers,
    }))


def main():
    args = sys.argv[1:]
    if len(args) >= 3 and args[0] == "split":
        seed = int(args[args.index("--seed") + 1]) if "--seed" in args else 0
        limit = int(args[args.index("--limit") + 1]) if "--limit" in args else 0
        split(args[1], args[2], seed, limit)
    elif len(args) == 3 and args[0] == "pbg":
        pbg(args[1], args[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
