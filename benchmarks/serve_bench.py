"""Latency and throughput of ``flipvqa serve`` (the bundled demo model by default).

    python benchmarks/serve_bench.py [--requests 200] [--clients 1 20] [-- SERVE FLAGS...]

Starts a real server on a free port, warms it up, then for each number of concurrent clients sends
``--requests`` questions in all (the bundled examples in turn, each client its own keep-alive
connection) and prints one JSON line: per client count the p50/p90 latency (ms) and the throughput
(requests/s), and the server's batch counters over that run (batches, questions, largest batch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from flipvqa.serve.launch import ServerProcess


def run_clients(url: str, bodies: list[dict], clients: int, total: int) -> tuple[list[float], float]:
    """``total`` requests from ``clients`` threads; (latencies in seconds, wall seconds)."""
    per_client = [total // clients + (1 if k < total % clients else 0) for k in range(clients)]
    latencies: list[float] = []
    lock = threading.Lock()
    gate = threading.Barrier(clients + 1)
    failures: list[str] = []

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            gate.wait()
            for i in range(per_client[k]):
                start = time.perf_counter()
                response = http.post("/api/ask", json=bodies[(k + i) % len(bodies)])
                took = time.perf_counter() - start
                if response.status_code != 200:
                    failures.append(response.text)
                with lock:
                    latencies.append(took)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    gate.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return latencies, wall


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per client count (default: 200)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 20], help="client counts (default: 1 20)")
    parser.add_argument("serve", nargs=argparse.REMAINDER, help="flags for flipvqa serve, after --")
    args = parser.parse_args()
    flags = [f for f in args.serve if f != "--"]
    log = Path(tempfile.gettempdir()) / "serve_bench.log"
    log.unlink(missing_ok=True)
    result: dict = {"requests": args.requests, "serve_flags": flags, "cpus": os.cpu_count(),
                    "load_before": [round(x, 2) for x in os.getloadavg()]}
    with ServerProcess([*flags, "-q"], log=log) as server:
        examples = httpx.get(server.url + "/api/examples").json()
        bodies = [{"example": e["id"]} for e in examples if e.get("question")]
        if not bodies:
            raise SystemExit("the server has no examples with questions to ask")
        run_clients(server.url, bodies, 4, 40)  # warm-up
        for clients in args.clients:
            before = server.health()
            latencies, wall = run_clients(server.url, bodies, clients, args.requests)
            after = server.health()
            result[f"clients_{clients}"] = {
                "p50_ms": round(statistics.median(latencies) * 1000, 2),
                "p90_ms": round(percentile(latencies, 0.9) * 1000, 2),
                "throughput_rps": round(len(latencies) / wall, 1),
                "batches": after["batches"] - before["batches"],
                "questions": after["questions"] - before["questions"],
                "mean_batch": round((after["questions"] - before["questions"])
                                    / max(1, after["batches"] - before["batches"]), 2),
                "largest_batch_so_far": after["largest_batch"],  # the server counts since its start
            }
        result["device"] = server.health()["device"]
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
