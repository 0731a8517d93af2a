# Sourced by the bench scripts that run an integration test at a larger size
# (benches/kills_at_scale.sh, benches/faults.sh): `test_summary TEST EXTRA_JSON` runs
# `cargo test --release --locked --test TEST` with its log on stderr, then prints the test's last
# `TEST-summary {json}` line with EXTRA_JSON's fields, whether it passed and the script's wall
# seconds added, and returns the test's exit status (1 when it printed no summary).
test_summary() {
  local test=$1 extra=$2 log start rc wall line
  log=$(mktemp)
  start=$(date +%s)
  set +e
  cargo test --release --locked --test "$test" -- --nocapture 2>&1 | tee "$log" >&2
  rc=${PIPESTATUS[0]}
  set -e
  wall=$(($(date +%s) - start))
  line=$(grep -a "^$test-summary " "$log" | tail -1 | cut -d' ' -f2-)
  rm -f "$log"
  if [ -z "$line" ]; then
    echo "{\"error\": \"the test printed no $test-summary\", \"exit\": $rc, \"script_wall_s\": $wall}"
    return 1
  fi
  python3 -c 'import json, sys
s = json.loads(sys.argv[1])
s.update(json.loads(sys.argv[2]), passed=sys.argv[3] == "0", script_wall_s=int(sys.argv[4]))
print(json.dumps(s))' "$line" "$extra" "$rc" "$wall"
  return "$rc"
}
