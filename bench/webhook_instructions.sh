#!/usr/bin/env bash
# User-space instructions per verified webhook, counted by valgrind (callgrind): a figure
# that does not move with the machine's other load, so two builds can be compared on it
# where bench/webhook.sh's CPU time per request varies by ±10% from run to run.
#
# Starts the binary under callgrind with bench/webhook.sh's hook (GitHub signature checked,
# delivery recorded, payload parsed, refused by the `allow` rule: 422, no job), sends
# SMALL and then LARGE requests over keep-alive connections, and reports
# (Ir(LARGE) - Ir(SMALL)) / (LARGE - SMALL). Counting starts once the intake has answered a
# probe (`callgrind_control -i on`), so start-up is not counted and shutdown cancels out.
# Kernel time (loopback TCP, scheduling; about 60% of drover's CPU per webhook) is not
# counted.
#
# Usage: bench/webhook_instructions.sh [path/to/drover]   (needs valgrind, python3, openssl;
# a Docker engine, as `drover run` waits for one before it takes webhooks)
# Knobs: SMALL (500), LARGE (3000), CONNECTIONS (4); OPS=0 for builds before the operator
# listener (as in bench/webhook.sh); KEEP=DIR keeps both profiles there (callgrind_annotate).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/webhook_common.sh
. "$ROOT/bench/webhook_common.sh"
bin=${1:-$ROOT/target/release/drover}
small=${SMALL:-500}
large=${LARGE:-3000}
connections=${CONNECTIONS:-4}
[ -x "$bin" ] || { echo "no drover binary at $bin (cargo build --release)" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 is not installed" >&2; exit 1; }

work=$(mktemp -d)
pid=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

webhook_fixture "$work"

# Sets $ir: the user-space instructions of one drover run, from its first answer on, that
# answers `n` verified webhooks. Not run in $(...): a failure must stop the script, and
# cleanup must see $pid.
instructions() {
  local n=$1 port
  port=$(free_port)
  webhook_config "$work" "$port" "$(free_port)"
  DROVER_LOG=warn valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/cg.out" \
    "$bin" run --config "$work/drover.yml" >"$work/drover.log" 2>&1 &
  pid=$!
  python3 - "$port" "$n" "$connections" "$signature" "$work/body.json" "$pid" <<'PY' || { echo "drover's log:" >&2; cat "$work/drover.log" >&2; exit 1; }
import http.client, subprocess, sys, time, threading
port, n, conns, signature, body_file, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
body = open(body_file, "rb").read()
def post(c, delivery):
    c.request("POST", "/hooks/github", body=body, headers={
        "Content-Type": "application/json", "X-GitHub-Event": "push",
        "X-GitHub-Delivery": delivery, "X-Hub-Signature-256": signature})
    r = c.getresponse(); r.read(); return r.status
# Asked until the full intake answers: while drover starts (slowly, under valgrind) it
# answers hooks 503, and builds before the waiting listener refuse or answer 404.
deadline, status = time.time() + 120, None
while status != 422:
    if time.time() > deadline: sys.exit("probe answered %s for 120 s, expected 422" % status)
    time.sleep(0.2)
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        status = post(c, "probe-%d" % time.time_ns())
        c.close()
    except OSError as e:
        status = e
subprocess.run(["callgrind_control", "-i", "on", pid], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
bad = []
def run(t, count):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for i in range(count):
        s = post(c, "bench-%d-%d" % (t, i))
        if s != 422: bad.append(s)
share = [n // conns + (1 if t < n % conns else 0) for t in range(conns)]
threads = [threading.Thread(target=run, args=(t, k)) for t, k in enumerate(share)]
for t in threads: t.start()
for t in threads: t.join()
if bad: sys.exit("%d answers were not 422: %s" % (len(bad), sorted(set(bad))))
PY
  kill -TERM "$pid"
  wait "$pid" || true
  pid=
  if [ -n "${KEEP:-}" ]; then cp "$work/cg.out" "$KEEP/callgrind.$n"; fi
  ir=$(awk '/^(summary|totals):/ {print $2; exit}' "$work/cg.out")
  [ -n "$ir" ] || { echo "no instruction total in callgrind's output" >&2; exit 1; }
}

instructions "$small"; a=$ir
instructions "$large"; b=$ir
echo "drover $("$bin" --version 2>/dev/null | cut -d' ' -f2): $a Ir for $small webhooks, $b Ir for $large"
awk -v a="$a" -v b="$b" -v n=$((large - small)) 'BEGIN {
  printf "user-space instructions per verified webhook: %.0f\n", (b - a) / n }'
