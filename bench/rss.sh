#!/usr/bin/env bash
# drover's resident memory when idle on a Swarm with 21 services / 45 tasks (the size
# docker-pygen was measured at: 36-38 MB). Needs a Swarm manager and the test images
# that scripts/test builds (127.0.0.1:5000/drover-test/busybox:latest).
# Usage: bench/rss.sh [path/to/drover]   (default target/release/drover; RUNS, default 3)
set -euo pipefail
bin=${1:-target/release/drover}
image=${BUSYBOX_IMAGE:-127.0.0.1:5000/drover-test/busybox:latest}
prefix=rssbench-$$
net=$prefix-web
work=$(mktemp -d)
cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null || true
  docker service ls -q --filter "name=$prefix" | xargs -r docker service rm >/dev/null
  sleep 2
  docker network rm "$net" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

docker network create -d overlay --attachable "$net" >/dev/null
# 21 services: 3 with 5 replicas, 15 with 2, 3 with 0 = 45 tasks.
for i in $(seq 1 21); do
  replicas=2
  [ "$i" -le 3 ] && replicas=5
  [ "$i" -gt 18 ] && replicas=0
  docker service create -d -q --name "$prefix-$i" --network "$net" --replicas "$replicas" \
    --label routing-host="svc$i.example.com" --label routing-port=80 --label routing-tls=false \
    --label prometheus-job="svc$i" --label prometheus-port=80 \
    "$image" httpd -f -p 80 -h / >/dev/null
done
echo "waiting for 45 tasks to run..."
for _ in $(seq 1 120); do
  n=$(docker service ls --filter "name=$prefix" --format '{{.Replicas}}' | awk -F/ '{s+=$1} END {print s}')
  [ "$n" -ge 45 ] && break
  sleep 1
done

cat > "$work/drover.yml" <<YML
http: { listen: 127.0.0.1:0 }
targets:
  - name: nginx
    template: builtin:nginx
    output: $work/nginx.conf
    network: $net
  - name: prometheus
    template: builtin:prometheus
    output: $work/prometheus.yml
    network: $net
YML
# Idle RSS is steady within one run but differs between runs by up to ~0.8 MiB (what the
# allocator kept from start-up), so drover is started RUNS times and the median reported.
runs=${RUNS:-3}
field() { echo "$status" | awk -v k="$1:" '$1 == k {print $2}'; }
for run in $(seq 1 "$runs"); do
  "$bin" run --config "$work/drover.yml" 2>"$work/log" &
  pid=$!
  sleep 15
  status=$(cat /proc/$pid/status)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  pid=
  upstreams=$(grep -c 'server 10\.' "$work/nginx.conf" || true)
  echo "run=$run services=21 tasks=$upstreams rss_kib=$(field VmRSS) peak_rss_kib=$(field VmHWM) anon_kib=$(field RssAnon) file_kib=$(field RssFile) threads=$(field Threads)" | tee -a "$work/runs"
done
python3 - "$work/runs" <<'PY'
import re, statistics, sys
runs = [dict(re.findall(r"(\w+)=(\d+)", line)) for line in open(sys.argv[1])]
med = lambda k: statistics.median(int(r[k]) for r in runs) / 1024
span = lambda k: "%.1f-%.1f" % (min(int(r[k]) for r in runs) / 1024, max(int(r[k]) for r in runs) / 1024)
print(f"drover idle RSS: {med('rss_kib'):.1f} MiB median of {len(runs)} runs ({span('rss_kib')}; "
      f"anonymous {med('anon_kib'):.1f}, file-backed {med('file_kib'):.1f}) "
      f"with 21 services / {runs[0]['tasks']} running tasks")
PY
