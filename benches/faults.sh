#!/usr/bin/env bash
# Faults with three instances (issue 24): the faults test (integration/faults.rs) in release mode
# against tansu, larger: the second and third instances join mid-stream, instances are SIGKILLed
# KILLS times (default 20) at seeded (SEED) random moments and restarted on their stores, and the
# second instance's network is cut (it runs in a network namespace of its own: root, `ip netns`)
# for longer than the group's session timeout, then restored; EVENTS_PER_STAGE events (default
# 5,000) are produced at each stage (joins, kills, the cut, the finish). It measures stale markers
# (a marker of a partition published after another instance took it over and numbered at or
# above that owner's base), late ones (numbered below it: the old owner's publication under way,
# which subscribers order before the base), rows where a subscriber's table and the owners'
# served rows differ, and edges lost and doubled once the first instance has taken every
# partition back through the changelogs. CUT=stop stalls the instance with SIGSTOP instead (what
# CI runs, with 3 kills and 1,000 events per stage).
# The test's log goes to stderr; the last line is one JSON object (the test's `faults-summary`,
# plus whether it passed and the script's wall seconds).
#   bash benches/faults.sh
#   KILLS=6 EVENTS_PER_STAGE=1000 bash benches/faults.sh      # a quick one
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${TANSU_BIN:-}" ] || bash .ci/setup >/dev/null
export LIBTORCH="${LIBTORCH:-$PWD/.venv/lib/python3.11/site-packages/torch}"
export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FAULT_TEST_KILLS=${KILLS:-20} FAULT_TEST_SEED=${SEED:-20261207}
export FAULT_TEST_EVENTS_PER_STAGE=${EVENTS_PER_STAGE:-5000}
case "${CUT:-netns}" in
  netns) export FAULT_TEST_CUT=netns ;;
  stop) ;;
  *) echo "CUT=${CUT}: netns or stop" >&2; exit 2 ;;
esac
source benches/test_summary.sh
test_summary faults "{}"
