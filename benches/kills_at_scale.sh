#!/usr/bin/env bash
# Kills at scale: the kill test (integration/kills.rs) on the synthetic TwHIN-shaped stream of
# NODES nodes and EDGES events (default 1,000,000 / 10,000,000; the Twitter schema of
# config/default.toml, produced without event ids), in release mode against tansu on 127.0.0.1.
# The daemon is SIGKILLed KILLS times (default 20) at seeded (SEED) random moments in ingest,
# training, checkpointing and publication, restarted after each, then left to finish. It
# measures whether the whole stream is stored exactly once (per (src, rel, dst): times stored
# against times produced; lost and duplicated edges each counted), whether the version numbers
# on the versions topic run 1, 2, 3, ... without a gap, and whether a subscriber's table equals
# the served rows (on a seeded sample of CHECK_NODES nodes, default 2,000), and how long it all
# takes. The test's log goes to stderr; the last line is one JSON object: kills per stage,
# lost, duplicated, versions, wall seconds (the test's and the script's, build included).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${TANSU_BIN:-}" ] || bash .ci/setup >/dev/null
export LIBTORCH="${LIBTORCH:-$PWD/.venv/lib/python3.11/site-packages/torch}"
export KILL_TEST_NODES=${NODES:-1000000} KILL_TEST_EDGES=${EDGES:-10000000}
export KILL_TEST_KILLS=${KILLS:-20} KILL_TEST_SEED=${SEED:-20260310}
[ -z "${CHECK_NODES:-}" ] || export KILL_TEST_CHECK_NODES=$CHECK_NODES
source benches/test_summary.sh
test_summary kills "{\"spec_nodes\": $KILL_TEST_NODES, \"spec_edges\": $KILL_TEST_EDGES}"
