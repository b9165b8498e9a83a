"""Request throughput of the LLM client: sequential vs bounded concurrency, against a local OpenAI-compatible
server that takes 100 ms per request (tests/openai_server.py), through the real `openai` async client and the
ledger, as the generate stage uses them.

    python benchmarks/llm_throughput.py [--requests 160] [--latency 0.1] [--concurrency 1 4 16 32]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]

from openai_server import FakeOpenAI  # noqa: E402
from pipeline.llm.client import Client  # noqa: E402
from pipeline.llm.ledger import Ledger  # noqa: E402
from pipeline.llm.openai_backend import OpenAIBackend  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    args = ap.parse_args()
    os.environ["TB_BENCH_KEY"] = "bench"
    params = {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "stop": None}
    base = None
    print(f"{'concurrency':>11} {'requests':>8} {'wall s':>7} {'req/s':>7} {'vs sequential':>14}")
    with FakeOpenAI(latency=args.latency) as server, tempfile.TemporaryDirectory() as tmp:
        for c in args.concurrency:
            backend = OpenAIBackend("bench-model", base_url=server.url, api_key_env="TB_BENCH_KEY")
            client = Client(backend=backend, ledger=Ledger(Path(tmp) / f"ledger-{c}.sqlite"),
                            model_id="bench-model", concurrency=c)
            prompts = [f"Come up with examples for task {i}" for i in range(args.requests)]
            t0 = time.perf_counter()
            client.complete_many(prompts, params)
            wall = time.perf_counter() - t0
            rate = args.requests / wall
            base = base or rate
            print(f"{c:>11} {args.requests:>8} {wall:>7.2f} {rate:>7.1f} {rate / base:>13.1f}x", flush=True)


if __name__ == "__main__":
    main()
