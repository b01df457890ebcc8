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
# The engine: a single-node Swarm of its own, a dockerd in a network namespace (the recipe
# of DESIGN.md, the slots of tests/support/cluster.rs under /tmp/drover-cluster), so it can
# be restarted: half-way through, it is stopped for SOAK_OUTAGE seconds (default 10) while
# a scale is in flight, then started again; the soak then waits for convergence as after
# any change and reports how long that took and how many lines drover logged meanwhile.
# The host engine is never stopped. Needs root, ip(8), socat, and the test images
# scripts/test builds in the registry on 127.0.0.1:5000.
# Usage: SOAK_MINUTES=5 bench/soak.sh [path/to/drover]   (default target/ci/drover)
set -euo pipefail
bin=${1:-target/ci/drover}
minutes=${SOAK_MINUTES:-30}
services=${SOAK_SERVICES:-4}
outage=${SOAK_OUTAGE:-10}
bound=${SOAK_BOUND:-90} # seconds a change may take to converge before the soak fails
image=${BUSYBOX_IMAGE:-127.0.0.1:5000/drover-test/busybox:latest}
prefix=soak-$$
net=$prefix-web
work=$(mktemp -d)
port=$((20000 + $$ % 20000))

log() { printf '[soak %5ss] %s\n' "$SECONDS" "$*" >&2; }

# ---- The namespace node ---------------------------------------------------------------
root=/tmp/drover-cluster
slot=
for s in $(seq 200 250); do # high slots: tests take the low ones first
  mkdir -p "$root"
  if mkdir "$root/$s" 2>/dev/null; then echo $$ >"$root/$s/owner"; slot=$s; break; fi
done
[ -n "$slot" ] || { log "no free slot under $root"; exit 1; }
node=drvn$slot; dir=$root/$slot; addr=10.213.$slot.2; host_addr=10.213.$slot.1
sock=$dir/docker.sock
export DOCKER_HOST=unix://$sock
engine_pid=; fwd_host=; fwd_node=

start_engine() {
  nsenter --net=/var/run/netns/$node socat TCP-LISTEN:5000,bind=127.0.0.1,fork,reuseaddr \
    TCP:$host_addr:5000 </dev/null >/dev/null 2>&1 &
  fwd_node=$!
  rm -f "$sock"
  nsenter --net=/var/run/netns/$node unshare --uts --mount --propagation private sh -c \
    "mount -t tmpfs tmpfs /run && hostname $node && exec dockerd --config-file $dir/daemon.json \
     --data-root $dir/data --exec-root /run/docker --pidfile /run/docker.pid \
     -H unix:///var/run/docker.sock -H unix://$sock" </dev/null >>"$dir/dockerd.log" 2>&1 &
  engine_pid=$!
  for _ in $(seq 1 200); do docker info >/dev/null 2>&1 && return 0; sleep 0.3; done
  log "the node's engine did not start"; tail -n 30 "$dir/dockerd.log" >&2; exit 1
}
stop_engine() {
  [ -n "$engine_pid" ] || return 0
  kill -TERM "$engine_pid" 2>/dev/null || true
  for _ in $(seq 1 300); do kill -0 "$engine_pid" 2>/dev/null || break; sleep 0.1; done
  for p in $(ip netns pids "$node" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
  wait "$engine_pid" 2>/dev/null || true
  [ -n "$fwd_node" ] && { wait "$fwd_node" 2>/dev/null || true; }
  engine_pid=; fwd_node=
}
cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null || true
  if [ -n "$engine_pid" ]; then
    docker service ls -q | xargs -r docker service rm >/dev/null 2>&1 || true
    stop_engine
  fi
  [ -n "$fwd_host" ] && kill "$fwd_host" 2>/dev/null || true
  ip netns del "$node" 2>/dev/null || true
  ip link del "drvh$slot" 2>/dev/null || true
  rm -rf "$work" "$dir"
}
trap cleanup EXIT

ip netns add "$node"
ip link add "drvh$slot" type veth peer name "drvc$slot"
ip link set "drvc$slot" netns "$node"
ip addr add "$host_addr/24" dev "drvh$slot"; ip link set "drvh$slot" up
ip netns exec "$node" ip addr add "$addr/24" dev "drvc$slot"
ip netns exec "$node" ip link set "drvc$slot" up
ip netns exec "$node" ip link set lo up
ip netns exec "$node" ip route add default via "$host_addr"
for d in -s -d; do
  iptables -C DOCKER-USER "$d" 10.213.0.0/16 -j ACCEPT 2>/dev/null \
    || iptables -I DOCKER-USER "$d" 10.213.0.0/16 -j ACCEPT
done
socat TCP-LISTEN:5000,bind=$host_addr,fork,reuseaddr TCP:127.0.0.1:5000 </dev/null >/dev/null 2>&1 &
fwd_host=$!
python3 -c 'import json,sys
try: host = json.load(open("/etc/docker/daemon.json"))
except Exception: host = {}
json.dump({k: host[k] for k in ("storage-driver", "mtu") if k in host}, sys.stdout)' >"$dir/daemon.json"
start_engine
docker swarm init --advertise-addr "$addr" >/dev/null
log "engine: $node ($addr), $DOCKER_HOST"

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
restart_at=$((SECONDS + minutes * 30)); restarted=0; restart_ms=-; outage_lines=-
while [ "$SECONDS" -lt "$end" ]; do
  round=$((round + 1))
  if [ "$restarted" = 0 ] && [ "$SECONDS" -ge "$restart_at" ]; then
    restarted=1
    mapfile -t live < <(docker service ls --filter "name=$prefix-" --format '{{.Name}}')
    victim=${live[RANDOM % ${#live[@]}]}
    docker service scale -d "$victim=$((RANDOM % 4 + 1))" >/dev/null
    lines0=$(wc -l <"$work/log")
    log "stopping the engine for ${outage}s with a scale of $victim in flight"
    stop_engine; sleep "$outage"
    outage_lines=$(($(wc -l <"$work/log") - lines0))
    start_engine
    log "engine back; drover logged $outage_lines lines while it was gone"
    t_restart=$(date +%s%N)
    converge "engine restart"
    restart_ms=$((($(date +%s%N) - t_restart) / 1000000))
    continue
  fi
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
[ "$restarted" = 1 ] || log "the soak ended before the engine restart (SOAK_MINUTES too short?)"
echo "soak ${minutes} min: ${changes} changes converged, worst ${worst} ms, mean $((total / (changes > 0 ? changes : 1))) ms;" \
  "webhooks ${hooks_ok}/${hooks} accepted; engine restart (${outage}s down): ${outage_lines} log lines while down, converged ${restart_ms} ms after it was back;" \
  "RSS ${rss0} -> ${rss1} KiB; fds ${fds0} -> ${fds1}; error log lines ${errors}"
