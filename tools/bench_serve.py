#!/usr/bin/env python3
"""Serving benchmarks for docs/benchmarks.md (CPU named), one of two:

Throughput, batched against --no-batch: starts `loupe serve` once per mode, drives it with
tools/load_test.py at each client count (streamed text chats, greedy, --max-tokens each):

    python3 tools/bench_serve.py --loupe target/release/loupe --model bench-models/qwen2-vl-2b-q4k.gguf \
        --clients 1,4,16 --max-tokens 32 [--parallel 16] [--threads 2]

Side by side with llama.cpp's server (`--llama-server PATH`): the same GGUF file, the same slots
(`--parallel` against llama-server's `-np`, each slot the same context), the same threads, the same
streamed greedy chats from tools/load_test.py, the two servers in turn:

    python3 tools/bench_serve.py --loupe target/release/loupe --model SmolLM2-135M-Instruct.Q4_1.gguf \
        --llama-server LLAMA/build/bin/llama-server --clients 1,4,16 --max-tokens 128 --requests 2

The server's overhead on one inspection: `loupe inspect` on N copies of one image (per-image time of
images 2..N, the prefix reused) against N requests to `/v1/inspect` one after another (after one to
warm up), the record's own time and the client's wall time:

    python3 tools/bench_serve.py --inspect-spec models/loupe-parts-demo/spec.toml [--image P] [--n 8]
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cpu_name():
    with open("/proc/cpuinfo") as f:
        text = f.read()
    name = re.search(r"model name\s*:\s*(.*)", text).group(1).strip()
    flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split())
    kind = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name} ({kind}, {len(re.findall('^processor', text, re.M))} cores)"


def start(loupe, model, parallel, threads, batch):
    cmd = [loupe, "serve", "--model", model, "--port", "0", "--no-audit", "--parallel", str(parallel)]
    if threads:
        cmd += ["--threads", str(threads)]
    if not batch:
        cmd.append("--no-batch")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            # keep reading its log, so a full pipe never stalls the server
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, m.group(1)
    sys.exit(f"bench_serve: the server stopped before listening ({proc.wait()})")


def start_llama(binary, model, parallel, threads, ctx):
    """llama-server on a free port, `parallel` slots of `ctx` tokens each."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-np", str(parallel),
           "-c", str(ctx * parallel), "--no-webui"]
    if threads:
        cmd += ["-t", str(threads), "-tb", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import urllib.request

    url = f"http://127.0.0.1:{port}"
    for line in proc.stderr:
        if "listening on" in line:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            # It listens before the model is loaded (503 until then).
            for _ in range(600):
                try:
                    with urllib.request.urlopen(url + "/health") as resp:
                        if resp.status == 200:
                            return proc, url
                except OSError:
                    pass
                time.sleep(0.1)
            break
    proc.kill()
    sys.exit(f"bench_serve: llama-server did not become ready ({proc.wait()})")


def drive(url, pid, args, clients, fresh=False):
    """tools/load_test.py's summary for `clients` clients of streamed text chats."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, str(HERE / "load_test.py"), "--url", url, "--image", args.image,
               "--clients", str(clients), "--requests", str(args.requests), "--mix", "0",
               "--text-only", "--max-tokens", str(args.max_tokens), "--pid", str(pid),
               "--json", out.name] + (["--fresh-connections"] if fresh else [])
        rc = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
        summary = json.load(open(out.name))
    if rc != 0:
        sys.exit(f"bench_serve: load_test failed: {summary['failures']}")
    return summary


def against_llama(args, clients):
    """Loupe's server and llama-server in turn on the same file, slots, threads and requests."""
    results = {}
    for name in ("loupe", "llama"):
        if name == "loupe":
            proc, url = start(args.loupe, args.model, args.parallel, args.threads, True)
        else:
            proc, url = start_llama(args.llama_server, args.model, args.parallel, args.threads, args.ctx)
        try:
            for c in clients:
                # llama-server closes a kept connection after a streamed answer: both sides
                # get a new connection per request.
                results[(name, c)] = s = drive(url, proc.pid, args, c, fresh=True)
                print(f"{name} clients={c}: {s['completion_tokens_per_s']:.2f} tok/s, "
                      f"p50 {s['chat_p50_s']:.2f} s", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait()
            time.sleep(1)
    print(f"CPU: {cpu_name()}; model {Path(args.model).name}; {args.max_tokens} tokens per answer, "
          f"{args.requests} requests per client, {args.parallel} slots, greedy, streamed\n")
    print("| clients | Loupe tok/s | llama-server tok/s | Loupe / llama-server | p50 latency Loupe | "
          "p50 latency llama-server | RSS end Loupe | RSS end llama-server |")
    print("|---|---|---|---|---|---|---|---|")
    for c in clients:
        a, b = results[("loupe", c)], results[("llama", c)]
        ratio = a["completion_tokens_per_s"] / b["completion_tokens_per_s"]
        print(f"| {c} | {a['completion_tokens_per_s']:.1f} | {b['completion_tokens_per_s']:.1f} | "
              f"{ratio:.2f}x | {a['chat_p50_s']:.2f} s | {b['chat_p50_s']:.2f} s | "
              f"{a['rss_end_mib']:.0f} MiB | {b['rss_end_mib']:.0f} MiB |")


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def inspect_overhead(args):
    import base64
    import shutil
    import urllib.request

    with tempfile.TemporaryDirectory() as tmp:
        imgs = Path(tmp) / "imgs"
        imgs.mkdir()
        for i in range(args.n):
            shutil.copy(args.image, imgs / f"part_{i:02}.png")
        cmd = [args.loupe, "inspect", "--spec", args.inspect_spec, "--no-audit", "--json",
               "--out", str(Path(tmp) / "out"), str(imgs)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode not in (0, 1):
            sys.exit(f"bench_serve: loupe inspect failed: {out.stderr}")
        cli = [json.loads(line)["timings"]["total_ms"] for line in out.stdout.splitlines()][1:]

        srv = [args.loupe, "serve", "--spec", args.inspect_spec, "--port", "0", "--no-audit"]
        if args.threads:
            srv += ["--threads", str(args.threads)]
        proc = subprocess.Popen(srv, stderr=subprocess.PIPE, text=True)
        url = None
        for line in proc.stderr:
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                url = m.group(1)
                threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
                break
        if url is None:
            sys.exit("bench_serve: the server stopped before listening")
        body = json.dumps({"image": base64.b64encode(open(args.image, "rb").read()).decode()}).encode()
        rec_ms, wall_ms = [], []
        try:
            for i in range(args.n + 1):
                req = urllib.request.Request(url + "/v1/inspect", data=body,
                                             headers={"content-type": "application/json"})
                t0 = time.perf_counter()
                with urllib.request.urlopen(req) as resp:
                    rec = json.load(resp)
                dt = (time.perf_counter() - t0) * 1e3
                if i > 0:  # the first warms the prefix
                    rec_ms.append(rec["timings"]["total_ms"])
                    wall_ms.append(dt)
        finally:
            proc.terminate()
            proc.wait()
    print(f"CPU: {cpu_name()}; spec {args.inspect_spec}; image {args.image}; medians of {args.n - 1} "
          f"(CLI, images 2..{args.n}) and {args.n} (server, after one warm-up)\n")
    print("| measure | ms |")
    print("|---|---|")
    print(f"| `loupe inspect`, per image (record total) | {median(cli):.1f} |")
    print(f"| `/v1/inspect`, the record's total | {median(rec_ms):.1f} |")
    print(f"| `/v1/inspect`, client wall time | {median(wall_ms):.1f} |")
    print(f"| server overhead (wall - CLI per image) | {median(wall_ms) - median(cli):.1f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--loupe", default="target/release/loupe")
    ap.add_argument("--model", help="the model (throughput)")
    ap.add_argument("--inspect-spec", help="measure the server's overhead on inspections under this spec")
    ap.add_argument("--n", type=int, default=8, help="inspections per side (--inspect-spec)")
    ap.add_argument("--image", default=str(HERE.parent / "models/loupe-parts-demo/samples/test/crack/000.png"))
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--llama-server", help="llama.cpp's llama-server: compare with it instead of --no-batch")
    ap.add_argument("--ctx", type=int, default=1024, help="llama-server's context per slot")
    args = ap.parse_args()
    if args.inspect_spec:
        return inspect_overhead(args)
    if not args.model:
        sys.exit("bench_serve: --model (throughput) or --inspect-spec (inspection overhead)")

    clients = [int(c) for c in args.clients.split(",")]
    if args.llama_server:
        return against_llama(args, clients)
    results = {}
    for batch in (True, False):
        proc, url = start(args.loupe, args.model, args.parallel, args.threads, batch)
        try:
            for c in clients:
                results[(batch, c)] = summary = drive(url, proc.pid, args, c)
                print(f"{'batched' if batch else 'no-batch'} clients={c}: "
                      f"{summary['completion_tokens_per_s']:.2f} tok/s, ttft p50 {summary['ttft_p50_s']:.2f} s",
                      file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait()
            time.sleep(1)

    print(f"CPU: {cpu_name()}; model {Path(args.model).name}; {args.max_tokens} tokens per answer, "
          f"{args.requests} requests per client, --parallel {args.parallel}\n")
    print("| clients | batched tok/s | --no-batch tok/s | gain | TTFT p50 batched | TTFT p50 --no-batch | RSS end |")
    print("|---|---|---|---|---|---|---|")
    for c in clients:
        b, n = results[(True, c)], results[(False, c)]
        gain = b["completion_tokens_per_s"] / n["completion_tokens_per_s"]
        print(f"| {c} | {b['completion_tokens_per_s']:.1f} | {n['completion_tokens_per_s']:.1f} | {gain:.2f}x | "
              f"{b['ttft_p50_s']:.2f} s | {n['ttft_p50_s']:.2f} s | {b['rss_end_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
