#!/usr/bin/env python3
"""Load test and throughput benchmark for a running `loupe serve` (standard library only).

    python3 tools/load_test.py --url http://127.0.0.1:8080 --image part.png --clients 64 --seconds 60 \
        [--mix 0.5] [--spec NAME] [--api-key KEY] [--pid SERVER_PID] [--max-tokens 16] [--json out.json]

Each client loops until the time is up (or for --requests each): a streamed chat completion with the
image (time to first token from the first content chunk) or, with probability --mix, a JSON
inspection of it named `load-<client>-<n>`. It reports the statuses, latencies (p50/p95), time to first
token, completion tokens per second over the whole run, and the server's resident memory at the start
and end (with --pid, from /proc). It fails (exit 1) on any 5xx other than 503, a broken connection, a
200 that does not parse, or an accepted inspection that is missing from `GET /v1/history`.
"""

import argparse
import base64
import http.client
import json
import random
import statistics
import sys
import threading
import time
import urllib.parse
from collections import Counter


def rss_mib(pid):
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


class Client:
    def __init__(self, url, api_key, timeout, fresh=False):
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80
        self.headers = {"content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self.fresh = fresh
        self.conn = None

    def _conn(self):
        if self.fresh:
            self.close()
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self.conn

    def request(self, method, path, body=None):
        """(status, body bytes, seconds)."""
        conn = self._conn()
        data = json.dumps(body).encode() if body is not None else None
        t0 = time.perf_counter()
        try:
            conn.request(method, path, body=data, headers=self.headers)
            resp = conn.getresponse()
            data = resp.read()
            if resp.getheader("connection", "").lower() == "close":
                self.close()
            return resp.status, data, time.perf_counter() - t0
        except Exception:
            self.close()
            raise

    def stream_chat(self, body):
        """(status, text, completion tokens, ttft seconds, total seconds) of a streamed answer."""
        conn = self._conn()
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                         headers=self.headers)
            resp = conn.getresponse()
            if resp.status != 200:
                resp.read()
                return resp.status, "", 0, None, time.perf_counter() - t0
            text, tokens, ttft = [], 0, None
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                for c in chunk.get("choices", []):
                    piece = c.get("delta", {}).get("content")
                    if piece:
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                        text.append(piece)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
            resp.read()
            return 200, "".join(text), tokens, ttft, time.perf_counter() - t0
        except Exception:
            self.close()
            raise

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--image", required=True)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0, help="run time (ignored with --requests)")
    ap.add_argument("--requests", type=int, help="requests per client instead of a time limit")
    ap.add_argument("--mix", type=float, default=0.5, help="share of inspections (0: chat only)")
    ap.add_argument("--spec", help="spec name for /v1/inspect (needed when several are loaded)")
    ap.add_argument("--api-key")
    ap.add_argument("--pid", type=int, help="server process id, for its resident memory")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--prompt", default="Describe the part in one sentence.")
    ap.add_argument("--text-only", action="store_true", help="chat without the image (decode speed)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the summary here too")
    ap.add_argument("--fresh-connections", action="store_true",
                    help="a new connection per request (servers that close a kept one after a stream)")
    args = ap.parse_args()

    with open(args.image, "rb") as f:
        img = base64.b64encode(f.read()).decode()
    probe = Client(args.url, args.api_key, args.timeout)
    status, body, _ = probe.request("GET", "/v1/models")
    if status != 200:
        sys.exit(f"load_test: GET /v1/models answered {status}: {body[:200]!r}")
    model = json.loads(body)["data"][0]["id"]
    probe.close()

    chat_content = [{"type": "text", "text": args.prompt}]
    if not args.text_only:
        chat_content.insert(0, {"type": "image_url", "image_url": {"url": "data:image/png;base64," + img}})

    lock = threading.Lock()
    statuses = Counter()
    failures = []
    lat = {"chat": [], "inspect": []}
    ttfts = []
    tokens = [0]
    accepted = []
    rss_start = rss_mib(args.pid)
    t_start = time.perf_counter()
    deadline = t_start + args.seconds

    def work(ci):
        rng = random.Random(args.seed * 1000 + ci)
        cl = Client(args.url, args.api_key, args.timeout, args.fresh_connections)
        n = 0
        while (n < args.requests) if args.requests is not None else (time.perf_counter() < deadline):
            n += 1
            route = "inspect" if rng.random() < args.mix else "chat"
            try:
                if route == "chat":
                    st, text, ntok, ttft, dt = cl.stream_chat({
                        "model": model, "max_tokens": args.max_tokens,
                        "temperature": args.temperature, "seed": rng.randrange(1 << 31),
                        "stream": True, "stream_options": {"include_usage": True},
                        "messages": [{"role": "user", "content": chat_content}]})
                    ok = st != 200 or ntok > 0
                else:
                    name = f"load-{ci}-{n}"
                    req = {"image": img, "name": name}
                    if args.spec:
                        req["spec"] = args.spec
                    st, body, dt = cl.request("POST", "/v1/inspect", req)
                    ok = True
                    if st == 200:
                        rec = json.loads(body)
                        ok = "verdict" in rec
                        with lock:
                            accepted.append(name)
                    ttft, ntok = None, 0
            except Exception as e:  # a broken connection or an unparsable answer
                with lock:
                    failures.append(f"{route}: {type(e).__name__}: {e}")
                    statuses[(route, "error")] += 1
                continue
            with lock:
                statuses[(route, st)] += 1
                if st == 200:
                    lat[route].append(dt)
                    tokens[0] += ntok
                    if ttft is not None:
                        ttfts.append(ttft)
                if not ok:
                    failures.append(f"{route}: a 200 without an answer")
                if st >= 500 and st != 503:
                    failures.append(f"{route}: status {st}")
            if st == 503:
                time.sleep(1.0)  # the server's Retry-After
        cl.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    rss_end = rss_mib(args.pid)

    missing = []
    if accepted:
        cl = Client(args.url, args.api_key, args.timeout, args.fresh_connections)
        st, body, _ = cl.request("GET", "/v1/history?limit=10000")
        if st != 200:
            failures.append(f"history: status {st}")
        else:
            logged = {row["image"] for row in json.loads(body)["data"]}
            missing = [a for a in accepted if a not in logged]
            if missing:
                failures.append(f"{len(missing)} accepted inspections missing from the audit log, "
                                f"e.g. {missing[:3]}")

    def pct(xs, p):
        if not xs:
            return None
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

    summary = {
        "clients": args.clients, "seconds": round(elapsed, 2), "mix": args.mix,
        "max_tokens": args.max_tokens,
        "statuses": {f"{r} {s}": c for (r, s), c in sorted(statuses.items(), key=str)},
        "chat_p50_s": pct(lat["chat"], 50), "chat_p95_s": pct(lat["chat"], 95),
        "inspect_p50_s": pct(lat["inspect"], 50), "inspect_p95_s": pct(lat["inspect"], 95),
        "ttft_p50_s": pct(ttfts, 50), "ttft_mean_s": statistics.fmean(ttfts) if ttfts else None,
        "completion_tokens": tokens[0], "completion_tokens_per_s": tokens[0] / elapsed,
        "inspections_per_s": len(lat["inspect"]) / elapsed,
        "audit_rows_checked": len(accepted), "audit_rows_missing": len(missing),
        "rss_start_mib": rss_start, "rss_end_mib": rss_end,
        "failures": failures[:20],
    }
    out = json.dumps(summary, indent=2)
    print(out)
    if args.json:
        with open(args.json, "w") as f:
            f.write(out + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
