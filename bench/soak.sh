#!/usr/bin/env bash
# Soak: bounded churn against one drover process, checking that its config always
# converges, and reporting drover's RSS and open file descriptors at start and end and the
# worst convergence time.
#
# Churn, until SOAK_MINUTES (default 30) have passed: every few seconds a random service
# is scaled between 0 and 4 replicas; every ~30 s a service is deployed or removed; every
# round a verified webhook is sent (it finds the digest already running: intake, job
# queue and digest lookup are exercised, nothing restarts). After every change the script
# waits until the rendered nginx file lists exactly the running task IPs of every soak
# service, and records how long that took (Swarm's own time to start tasks included).
#
# The host engine is shared, so it is never restarted here; engine outages are covered by
# the fault tests. Needs a Swarm manager and the test images scripts/test builds.
# Usage: SOAK_MINUTES=5 bench/soak.sh [path/to/drover]   (default target/ci/drover)
set -euo pipefail
bin=${1:-target/ci/drover}
minutes=${SOAK_MINUTES:-30}
services=${SOAK_SERVICES:-4}
bound=${SOAK_BOUND:-90} # seconds a change may take to converge before the soak fails
image=${BUSYBOX_IMAGE:-127.0.0.1:5000/drover-test/busybox:latest}
prefix=soak-$$
net=$prefix-web
work=$(mktemp -d)
port=$((20000 + $$ % 20000))
cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null || true
  docker service ls -q --filter "name=$prefix-" | xargs -r docker service rm >/dev/null
  sleep 3
  docker network rm "$net" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

log() { printf '[soak %5ss] %s\n' "$SECONDS" "$*" >&2; }

docker network create -d overlay --attachable "$net" >/dev/null
deploy() { # deploy NAME REPLICAS
  docker service create -d -q --name "$1" --network "$net" --replicas "$2" \
    --label routing-host="$1.soak.test" --label routing-port=80 --label routing-tls=false \
    "$image" httpd -f -p 80 -h / >/dev/null
}
next=1
for _ in $(seq 1 "$services"); do deploy "$prefix-$next" 1; next=$((next + 1)); done

printf 'soak-token' >"$work/token"
cat >"$work/drover.yml" <<YML
http: { listen: 127.0.0.1:$port }
resync: 60s
jobs: { state_file: $work/jobs.json }
targets:
  - name: nginx
    template: builtin:nginx
    output: $work/nginx.conf
    network: $net
hooks:
  - name: soak
    kind: generic
    token_file: $work/token
    quiet: 1s
    action: update-services
YML
DROVER_LOG=warn DROVER_OPS_LISTEN="127.0.0.1:$((port + 1))" "$bin" run --config "$work/drover.yml" 2>"$work/log" &
pid=$!

# The running task IPs on $net of every soak service, sorted, one per line.
expected() {
  local ids
  ids=$(docker service ls -q --filter "name=$prefix-" | xargs -r -n1 docker service ps -q \
        --filter desired-state=running 2>/dev/null || true)
  [ -z "$ids" ] && return 0
  # shellcheck disable=SC2086
  docker inspect --format '{{.Status.State}} {{range .NetworksAttachments}}{{if eq .Network.Spec.Name "'"$net"'"}}{{range .Addresses}}{{.}}{{end}}{{end}}{{end}}' $ids 2>/dev/null \
    | awk '$1 == "running" && $2 != "" { sub(/\/.*/, "", $2); print $2 }' | sort
}
rendered() { grep -oE 'server 10\.[0-9.]+:80;' "$work/nginx.conf" 2>/dev/null | sed 's/server //; s/:80;//' | sort || true; }

worst=0; changes=0; total=0
# converge WHAT: waits until the file matches Swarm; fails the soak past $bound.
converge() {
  local t0=$SECONDS start_ns end_ns ms
  start_ns=$(date +%s%N)
  until [ "$(expected)" = "$(rendered)" ]; do
    if [ $((SECONDS - t0)) -gt "$bound" ]; then
      log "NOT CONVERGED after ${bound}s: $1"; diff <(expected) <(rendered) >&2 || true
      tail -n 50 "$work/log" >&2; exit 1
    fi
    sleep 0.3
  done
  end_ns=$(date +%s%N); ms=$(((end_ns - start_ns) / 1000000))
  changes=$((changes + 1)); total=$((total + ms))
  [ "$ms" -gt "$worst" ] && worst=$ms
  return 0
}

for _ in $(seq 1 100); do curl -fsS -o /dev/null "http://127.0.0.1:$port/healthz" 2>/dev/null && break; sleep 0.3; done
converge "start"
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
fds() { ls "/proc/$pid/fd" | wc -l; }
rss0=$(rss); fds0=$(fds)
log "start: rss ${rss0} KiB, ${fds0} fds; churning for ${minutes} min"

end=$((SECONDS + minutes * 60)); round=0; hooks_ok=0; hooks=0
while [ "$SECONDS" -lt "$end" ]; do
  round=$((round + 1))
  mapfile -t live < <(docker service ls --filter "name=$prefix-" --format '{{.Name}}')
  if [ $((round % 10)) -eq 0 ]; then
    if [ "${#live[@]}" -gt 2 ] && [ $((RANDOM % 2)) -eq 0 ]; then
      victim=${live[RANDOM % ${#live[@]}]}; docker service rm "$victim" >/dev/null; what="remove $victim"
    else
      deploy "$prefix-$next" $((RANDOM % 3 + 1)); what="deploy $prefix-$next"; next=$((next + 1))
    fi
  else
    victim=${live[RANDOM % ${#live[@]}]}; n=$((RANDOM % 5))
    docker service scale -d "$victim=$n" >/dev/null; what="scale $victim=$n"
  fi
  hooks=$((hooks + 1))
  code=$(curl -s -o /dev/null -w '%{http_code}' -H 'X-Drover-Token: soak-token' \
    -H 'Content-Type: application/json' -d "{\"image\":\"$image\",\"round\":$round}" "http://127.0.0.1:$port/hooks/soak" || true)
  [ "$code" = 202 ] && hooks_ok=$((hooks_ok + 1))
  converge "$what"
  sleep $((RANDOM % 3 + 1))
done

rss1=$(rss); fds1=$(fds)
kill -0 "$pid" || { log "drover died"; tail -n 50 "$work/log" >&2; exit 1; }
errors=$(grep -c -E '"level":"ERROR"| ERROR ' "$work/log" || true)
echo "soak ${minutes} min: ${changes} changes converged, worst ${worst} ms, mean $((total / (changes > 0 ? changes : 1))) ms;" \
  "webhooks ${hooks_ok}/${hooks} accepted; RSS ${rss0} -> ${rss1} KiB; fds ${fds0} -> ${fds1}; error log lines ${errors}"
