#!/usr/bin/env python3
"""Hostile HTTP on loopback, bounded: what drover's peak RSS does under it.

Starts `drover run` with one GitHub hook (needs a Docker engine: the intake starts once the
engine answers) and, one after another:
  1. one POST with 1,000,000 one-byte chunks (chunked encoding): refused at max_body;
  2. 40 connections that each declare a 1 MiB body, send most of it and stall;
  3. 200 connections that never finish their headers (slowloris);
  4. a forged flood (wrong signatures, keep-alive, several threads) for DURATION seconds,
     with one correctly signed delivery sent from another source address mid-flood.
Reports the status counts, whether the slow connections were closed, whether the signed
delivery got 202, and VmHWM (peak RSS) / VmRSS from /proc. Target: peak < 32 MB.

Usage: bench/http_flood.py [--bin target/ci/drover] [--duration 10] [--threads 8]
"""
import argparse, collections, hashlib, hmac, os, socket, subprocess, sys, tempfile, threading, time

SECRET = b"flood-bench-secret"
BODY = b'{"ref":"refs/heads/main","repository":{"full_name":"octocat/hello-world"}}'


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def mem(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS"):
                out[k] = int(v.split()[0]) / 1024
    return out


def status_of(sock):
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        data += chunk
    return int(data.split(b" ", 2)[1])


def request(addr, path, headers, body, source="127.0.0.1"):
    s = socket.create_connection(addr, timeout=10, source_address=(source, 0))
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    s.sendall(head.encode() + b"\r\n" + body)
    try:
        return status_of(s)
    finally:
        s.close()


def signed_headers(delivery, secret=SECRET):
    sig = "sha256=" + hmac.new(secret, BODY, hashlib.sha256).hexdigest()
    return {"X-GitHub-Event": "push", "X-GitHub-Delivery": delivery, "X-Hub-Signature-256": sig}


def chunk_bomb(addr):
    s = socket.create_connection(addr, timeout=60)
    s.sendall(b"POST /hooks/github HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
              b"X-GitHub-Event: push\r\nX-GitHub-Delivery: bomb\r\n\r\n")
    block = b"1\r\nx\r\n" * 10_000
    try:
        for _ in range(100):
            s.sendall(block)
        s.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # refused mid-way: the server closed the connection
    try:
        return status_of(s)
    except OSError:
        return None
    finally:
        s.close()


def closed(s, wait):
    s.settimeout(wait)
    try:
        while True:
            if not s.recv(4096):
                return True
    except socket.timeout:
        return False
    except OSError:
        return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/ci/drover")
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--threads", type=int, default=8)
    a = ap.parse_args()
    work = tempfile.mkdtemp()
    port, ops = free_port(), free_port()
    addr = ("127.0.0.1", port)
    with open(os.path.join(work, "secret"), "wb") as f:
        f.write(SECRET + b"\n")
    cfg = os.path.join(work, "drover.yml")
    with open(cfg, "w") as f:
        f.write(f"http: {{ listen: 127.0.0.1:{port}, ops: {{ listen: 127.0.0.1:{ops} }} }}\n"
                f"hooks:\n  - name: github\n    kind: github\n    secret_file: {work}/secret\n"
                f"    events: [push]\n    allow: {{ ref: refs/heads/never }}\n    action: update-services\n")
    proc = subprocess.Popen([a.bin, "run", "--config", cfg], stderr=open(os.path.join(work, "log"), "w"))
    try:
        for _ in range(300):
            try:
                if request(addr, "/hooks/github", {}, b"{}") == 401:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            sys.exit("drover's intake did not come up; log in " + work)
        print(f"idle: {mem(proc.pid)}")

        print(f"1. 1,000,000 one-byte chunks -> {chunk_bomb(addr)}; {mem(proc.pid)}")

        stalled = []
        for _ in range(40):
            try:
                s = socket.create_connection(addr, timeout=10)
                s.sendall(b"POST /hooks/github HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n")
                s.sendall(b"x" * 1_000_000)
                stalled.append(s)
            except OSError:
                pass
        time.sleep(1)
        print(f"2. 40 stalled 1 MiB bodies ({len(stalled)} connected); {mem(proc.pid)}")

        slow = []
        for _ in range(200):
            try:
                s = socket.create_connection(addr, timeout=10)
                s.sendall(b"POST /hooks/github HTTP/1.1\r\nHost: x\r\nX-Slow")
                slow.append(s)
            except OSError:
                pass
        shut = sum(closed(s, 15) for s in slow)
        print(f"3. 200 unfinished headers: {shut} closed by drover within 15 s; {mem(proc.pid)}")
        for s in stalled + slow:
            s.close()

        counts = collections.Counter()
        lock = threading.Lock()
        stop = time.time() + a.duration
        forged = signed_headers("forged", b"wrong")

        def flood():
            n = 0
            while time.time() < stop:
                n += 1
                try:
                    st = request(addr, "/hooks/github", {**forged, "X-GitHub-Delivery": f"f{n}"}, BODY)
                except OSError:
                    st = "conn-error"
                with lock:
                    counts[st] += 1

        threads = [threading.Thread(target=flood) for _ in range(a.threads)]
        for t in threads:
            t.start()
        time.sleep(a.duration / 2)
        # GitHub comes from elsewhere: another loopback source address.
        legit = request(addr, "/hooks/github", signed_headers("real-1"), BODY, source="127.0.0.2")
        for t in threads:
            t.join()
        print(f"4. forged flood {a.duration:.0f}s x {a.threads} threads: {dict(counts)}; "
              f"signed delivery mid-flood -> {legit} (422 = verified, then refused by the allow rule)")
        m = mem(proc.pid)
        print(f"end: {m}")
        print(f"peak RSS {m['VmHWM']:.1f} MB (target < 32 MB)")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
