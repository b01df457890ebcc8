#!/usr/bin/env python3
"""Config convergence latency: time from Swarm reporting a new task `running` to drover's
rendered file listing that task's IP. Scales a service up one task at a time, N times.

Needs a Swarm manager, the test images from scripts/test and a release build.
Usage: bench/convergence.py [--steps 20] [--bin target/release/drover]
Prints p50/p99/max of the lag in ms; DESIGN.md targets p99 <= 500 ms beyond debounce min.
"""
import argparse, datetime, json, os, re, subprocess, sys, tempfile, time

def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()

def parse_ts(ts):
    # Engine timestamps carry nanoseconds; Python takes microseconds.
    m = re.match(r"(.*T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", ts)
    frac = (m.group(2) or ".0")[:7]
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.datetime.fromisoformat(m.group(1) + frac + tz).timestamp()

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--bin", default="target/release/drover")
    ap.add_argument("--image", default="127.0.0.1:5000/drover-test/busybox:latest")
    a = ap.parse_args()
    name = f"convbench-{os.getpid()}"
    work = tempfile.mkdtemp()
    out = os.path.join(work, "nginx.conf")
    sh("docker", "network", "create", "-d", "overlay", "--attachable", name)
    sh("docker", "service", "create", "-d", "--name", name, "--network", name, "--replicas", "1",
       "--label", "routing-host=conv.example.com", "--label", "routing-port=80",
       "--label", "routing-tls=false",
       a.image, "httpd", "-f", "-p", "80", "-h", "/")
    cfg = os.path.join(work, "drover.yml")
    with open(cfg, "w") as f:
        f.write(f"http: {{ listen: 127.0.0.1:0 }}\ntargets:\n  - name: nginx\n    template: builtin:nginx\n"
                f"    output: {out}\n    network: {name}\n    debounce: {{ min: 250ms, max: 2s }}\n")
    proc = subprocess.Popen([a.bin, "run", "--config", cfg], stderr=open(os.path.join(work, "log"), "w"))
    lags = []
    try:
        def servers():
            try:
                return set(re.findall(r"server (10\.[\d.]+):", open(out).read()))
            except FileNotFoundError:
                return set()
        deadline = time.time() + 60
        while len(servers()) < 1 and time.time() < deadline:
            time.sleep(0.05)
        for step in range(2, a.steps + 2):
            before = servers()
            sh("docker", "service", "scale", "-d", f"{name}={step}")
            deadline = time.time() + 60
            while len(servers()) < step and time.time() < deadline:
                time.sleep(0.005)
            seen = time.time()
            new_ips = servers() - before
            tasks = json.loads(sh("docker", "inspect", *sh("docker", "service", "ps", "-q", "-f",
                                  "desired-state=running", name).split()))
            running_at = None
            for t in tasks:
                ips = {addr.split("/")[0] for n in t.get("NetworksAttachments", []) for addr in n.get("Addresses", [])}
                if ips & new_ips and t["Status"]["State"] == "running":
                    running_at = parse_ts(t["Status"]["Timestamp"])
            if running_at is None:
                print(f"step {step}: new task not found", file=sys.stderr)
                continue
            lags.append((seen - running_at) * 1000)
    finally:
        proc.terminate()
        proc.wait()
        subprocess.run(["docker", "service", "rm", name], capture_output=True)
        time.sleep(3)
        subprocess.run(["docker", "network", "rm", name], capture_output=True)
    lags.sort()
    if not lags:
        sys.exit("no measurements")
    p = lambda q: lags[min(len(lags) - 1, int(round(q * (len(lags) - 1))))]
    print(f"convergence lag over {len(lags)} scale-ups (task running -> file updated): "
          f"p50 {p(0.5):.0f} ms, p99 {p(0.99):.0f} ms, max {lags[-1]:.0f} ms (debounce min 250 ms)")

main()
