"""`graft serve` throughput and latency against the same model called in-process.

For a trained VLM run and N questions of the built-in world's test split (one image each):

  (a) in-process: `graft.api.load(run).generate(image, question)`, one question at a time — what
      `graft generate` does per call, without the process start;
  (b) the server (graft/serve.py, started in this process on a free port) with 1 client;
  (c) the same server with 16 concurrent clients (threads, plain urllib).

All three decode greedily up to the same `--max-tokens`. Printed for each: requests/s and p50 / p95
latency, and the ratio of the server's rate to the in-process one. The server generates one
request at a time behind a lock, so (c) measures queueing, not batching. The clients run in the same
process as the server: keep the machine otherwise idle, and compare figures from one machine only.

    python benchmarks/serve.py --run runs/demo [--n 64] [--clients 16] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shlex
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

import graft
from graft.data.world_source import make_world
from graft.serve import make_server


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a trained VLM run directory (e.g. runs/demo)")
    p.add_argument("--n", type=int, default=64, help="questions of the test split, one per scene")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients of (c)")
    p.add_argument("--max-tokens", type=int, default=32, help="greedy tokens at most per answer (graft generate's)")
    return p.parse_args()


def questions(run, n: int) -> list[tuple[object, str]]:
    """(image, question) of the first n test scenes that have a question."""
    world, out, index = make_world(run.cfg), [], 0
    while len(out) < n:
        sample = world.sample("test", index)
        if sample.qa:
            out.append((sample.image, sample.qa[index % len(sample.qa)].question))
        index += 1
    return out


def body(name: str, image, question: str, max_tokens: int) -> bytes:
    png = io.BytesIO()
    image.save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    return json.dumps({"model": name, "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]}).encode()


def timed_call(fn) -> tuple[float, str]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def post(address: str, data: bytes) -> tuple[float, str]:
    """(seconds, answer) of one chat completion."""
    req = urllib.request.Request(address + "/v1/chat/completions", data, {"Content-Type": "application/json"})

    def call() -> str:
        with urllib.request.urlopen(req, timeout=600) as res:
            return json.loads(res.read())["choices"][0]["message"]["content"]

    return timed_call(call)


def figures(label: str, latencies: list[float], wall: float) -> tuple[str, float]:
    """One printed line, and requests/s."""
    rate = len(latencies) / wall
    q = statistics.quantiles(latencies, n=20, method="inclusive")  # q[9]: p50, q[18]: p95
    return f"{label:<34} {rate:8.2f} req/s   p50 {q[9] * 1e3:8.1f} ms   p95 {q[18] * 1e3:8.1f} ms", rate


def timed_calls(fn, items, clients: int) -> tuple[list[float], float, list[str]]:
    """(latency of each call, wall seconds of all, answers) with `clients` calls in flight."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(fn, items))
    return [t for t, _ in done], time.perf_counter() - start, [a for _, a in done]


def main() -> None:
    args = parse()
    run = graft.load(args.run)
    items = questions(run, args.n)

    def in_process(item):
        return timed_call(lambda: run.generate(*item, max_new_tokens=args.max_tokens))

    run.generate(*items[0], max_new_tokens=args.max_tokens)  # warm-up
    lat, wall, expected = timed_calls(in_process, items, 1)
    lines, base = [], figures("(a) in-process Run.generate", lat, wall)
    lines.append(base[0])
    server = make_server(run, "127.0.0.1", 0)
    server.RequestHandlerClass.log_message = lambda *a: None  # no access log line per request
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address, name = f"http://127.0.0.1:{server.server_address[1]}", run.dir.path.name
    bodies = [body(name, image, q, args.max_tokens) for image, q in items]
    post(address, bodies[0])  # warm-up
    try:
        for clients in (1, args.clients):
            lat, wall, answers = timed_calls(lambda b: post(address, b), bodies, clients)
            line, rate = figures(f"({'b' if clients == 1 else 'c'}) server, {clients} client{'s' * (clients > 1)}",
                                 lat, wall)
            same = sum(a == e for a, e in zip(answers, expected)) / len(items)
            lines.append(f"{line}   server/in-process {rate / base[1]:.2f}x   answers equal {same:.2f}")
    finally:
        server.shutdown()
        server.server_close()
    print(f"run: {args.run} ({run.cfg.model}), {len(items)} questions, greedy, up to {args.max_tokens} tokens; "
          f"torch threads: {torch.get_num_threads()}, device: {next(run.model.parameters()).device}")
    print("\n".join(lines))
    print("command: python " + shlex.join(sys.argv))


if __name__ == "__main__":
    main()
