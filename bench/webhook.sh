#!/usr/bin/env bash
# Webhook intake throughput: valid GitHub signatures on the verified path.
#
# Starts target/release/drover (`drover run --config FILE`) with one `kind: github` hook and
# drives POST /hooks/github with wrk (-t2 -c16 -d10s, loopback only). Every request carries a
# valid X-Hub-Signature-256 and its own X-GitHub-Delivery, so each one is rate-checked,
# read, HMAC-verified, recorded for replay protection, parsed and matched against the
# hook's `allow` rule. The rule (`ref: refs/heads/never`) rejects after all that (422), so
# no job is queued and nothing reaches the engine: the figure is the cost of verification,
# not of Swarm. Target (DESIGN.md): >= 30,000 verified requests/s, p99 <= 2 ms on 2 cores.
#
# Usage: bench/webhook.sh [path/to/drover]   (needs wrk, openssl; a Docker engine for `run`)
# Knobs: DURATION (10s), CONNECTIONS (16), THREADS (2), PORT (free port); OPS=0 for builds
# before the separate operator listener (e.g. cfcd1e2): metrics are
# then on the public port and the config has no `http.ops`, which such builds refuse.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin=${1:-$ROOT/target/release/drover}
duration=${DURATION:-10s}
connections=${CONNECTIONS:-16}
threads=${THREADS:-2}
# shellcheck source=bench/webhook_common.sh
. "$ROOT/bench/webhook_common.sh"
port=${PORT:-$(free_port)}
ops_port=$(free_port)
# Builds before the operator listener serve metrics on the public port.
if [ "${OPS:-1}" = 0 ]; then ops_port=$port; fi
[ -x "$bin" ] || { echo "no drover binary at $bin (cargo build --release)" >&2; exit 1; }
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 1; }

work=$(mktemp -d)
cleanup() {
  if [ -n "${pid:-}" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

webhook_fixture "$work"
webhook_config "$work" "$port" "$ops_port"

DROVER_LOG=${DROVER_LOG:-warn} "$bin" run --config "$work/drover.yml" >"$work/drover.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  curl -fsS -o /dev/null "http://127.0.0.1:$port/healthz" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || { echo "drover exited:" >&2; cat "$work/drover.log" >&2; exit 1; }
  sleep 0.1
done
# One request by hand: the path must verify (422 from the rule), not fail the signature (401).
# Asked until the full intake answers: while drover starts, its listener answers hooks 503
# (try again). Older builds closed that listener before binding the full one, so a refused
# connection (000) is asked again too.
code=000
for _ in $(seq 1 50); do
  code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$port/hooks/github" \
    -H "X-GitHub-Event: push" -H "X-GitHub-Delivery: bench-probe" \
    -H "X-Hub-Signature-256: $signature" --data-binary @"$work/body.json" || true)
  [ "$code" = 000 ] || [ "$code" = 503 ] || break
  sleep 0.1
done
[ "$code" = 422 ] || { echo "probe answered $code, expected 422 (verified, rule refused)" >&2; exit 1; }

echo "drover $("$bin" --version 2>/dev/null | cut -d' ' -f2) on $(nproc) cores; wrk -t$threads -c$connections -d$duration"
# drover's own CPU time (user + system, in clock ticks) around the run: CPU per request is a
# figure other load on the machine disturbs far less than requests/s and p99.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
before=$(cpu_ticks)
BODY_FILE="$work/body.json" SIGNATURE="$signature" HOOK_PATH=/hooks/github \
  wrk -t"$threads" -c"$connections" -d"$duration" -s "$ROOT/bench/webhook.lua" "http://127.0.0.1:$port" | tee "$work/wrk.out"
after=$(cpu_ticks)
requests=$(awk '/^requests:/ {print $2}' "$work/wrk.out")
hz=$(getconf CLK_TCK)
awk -v t=$((after - before)) -v hz="$hz" -v n="$requests" 'BEGIN {
  printf "drover CPU: %.2f s for %d requests = %.1f us per verified request\n", t / hz, n, t / hz / n * 1e6 }'

rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
echo "drover RSS after the run: $((rss / 1024)) MB"
curl -fsS "http://127.0.0.1:$ops_port/metrics" | grep -E '^drover_webhook_(requests|signature)' || true
