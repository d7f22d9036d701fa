"""Serving under concurrent load: `tuneloop serve` against `mlflow models serve` of the
same registered version and a transformers `pipeline` behind FastAPI.

    .venv/bin/python -m benchmarks.serve_load --project DIR   # a project with a champion; ~6 min on 2 cores
    .venv/bin/python -m benchmarks.serve_load                 # trains one first (shipped movies, ~10 min more)

Each server runs alone on loopback, one at a time, with the machine's threads;
the load generator is one asyncio process (httpx) of 1, 8 or 32 clients taking
requests from one shuffled list: `--singles` single-text requests and
`--batches` requests of 32 texts (at 1 client: the single texts only). The
texts are the project's test rows, cycled. Per server and client count:
requests/s and texts/s over the whole run, p50 and p99 latency of the
single-text requests, and the non-200 answers. After each tuneloop run its
prediction store is counted: it must hold exactly one new row per answered
text. `mlflow models serve` and tuneloop serve answer with the same model
version (their labels are compared on 200 texts); the pipeline peer has the
same encoder and max length but an untrained head (equal compute per text).
Writes benchmarks/results/serve-load-<date>.json. Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.measure import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BIN = Path(sys.executable).parent
BATCH = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project_facts(project: Path) -> dict:
    """The registered model's name, the test texts and the prediction store of a project."""
    import pandas as pd
    import yaml

    from tuneloop.values.config import ServeConfig

    params = yaml.safe_load((project / "params.yaml").read_text())
    splits = pd.read_parquet(project / "data" / "split" / "splits.parquet")
    texts = splits.loc[splits["split"] == "test", "text"].astype(str).tolist()
    serve = {key: value for key, value in vars(ServeConfig(**params.get("serve") or {})).items()
             if key in ("batch_size", "scoring_workers", "batch_window_ms")}
    return {"model_name": params["mlflow"]["model_name"], "texts": texts, "serve": serve,
            "max_length": params["finetune"]["max_length"],
            "store": f"sqlite:///{project / 'state' / 'predictions.db'}"}


def store_rows(url: str) -> int:
    from tuneloop.service.store import PredictionStore

    return PredictionStore(url).count()


def servers(project: Path, facts: dict) -> dict[str, dict]:
    """How to start each server and speak to it."""
    from tuneloop.model.classifier import resolve_model_path

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # mlflow starts `uvicorn` by name
    return {
        "tuneloop serve": {
            "argv": lambda port: [str(BIN / "tuneloop"), "serve", "--root", str(project), "--port", str(port)],
            "cwd": project, "env": os.environ, "health": "/health", "path": "/predict",
            "body": lambda texts: {"texts": texts}},
        "mlflow models serve": {
            "argv": lambda port: [str(BIN / "mlflow"), "models", "serve", "-m",
                                  f"models:/{facts['model_name']}@champion", "--env-manager", "local",
                                  "-p", str(port), "-h", "127.0.0.1"],
            "cwd": project, "env": env, "health": "/ping", "path": "/invocations",
            "body": lambda texts: {"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}}},
        "pipeline + FastAPI": {
            "argv": lambda port: [sys.executable, "-m", "uvicorn", "benchmarks.pipeline_server:app",
                                  "--port", str(port), "--log-level", "warning"],
            "cwd": ROOT, "env": {**os.environ, "TUNELOOP_BENCH_MODEL": str(resolve_model_path("all-MiniLM-L6-v2")),
                                 "TUNELOOP_BENCH_MAX_LENGTH": str(facts["max_length"])},
            "health": "/health", "path": "/predict", "body": lambda texts: {"texts": texts}},
    }


@contextmanager
def running(spec: dict, log: Path):
    """The server, started and healthy (at most 180 s), stopped afterwards."""
    import httpx

    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen(spec["argv"](port), cwd=spec["cwd"], env=spec["env"], stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{spec['argv'](port)[:3]} exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(url + spec["health"], timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"not healthy in 180 s: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def schedule(texts: list[str], singles: int, batches: int, seed: int) -> list[list[str]]:
    """Requests in random order: `singles` of one text, `batches` of BATCH texts."""
    cycle = iter(texts * (1 + (singles + batches * BATCH) // max(1, len(texts))))
    requests = [[next(cycle)] for _ in range(singles)] + [[next(cycle) for _ in range(BATCH)] for _ in range(batches)]
    random.Random(seed).shuffle(requests)
    return requests


async def load(url: str, spec: dict, requests: list[list[str]], clients: int) -> dict:
    """`clients` concurrent callers working through `requests`; times and answers."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    single_ms, statuses, answered = [], {}, 0

    async def caller(client: httpx.AsyncClient) -> None:
        nonlocal answered
        while not queue.empty():
            texts = queue.get_nowait()
            started = time.perf_counter()
            response = await client.post(url + spec["path"], json=spec["body"](texts))
            elapsed = (time.perf_counter() - started) * 1000
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code == 200:
                answered += len(texts)
                if len(texts) == 1:
                    single_ms.append(elapsed)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(caller(client) for _ in range(clients)))
        seconds = time.perf_counter() - started
    return {"clients": clients, "requests": len(requests), "texts": sum(map(len, requests)), "seconds": seconds,
            "requests_per_s": len(requests) / seconds, "texts_per_s": answered / seconds,
            "single_p50_ms": float(np.percentile(single_ms, 50)) if single_ms else None,
            "single_p99_ms": float(np.percentile(single_ms, 99)) if single_ms else None,
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "answered_texts": answered}


def labels_of(url: str, spec: dict, texts: list[str]) -> list[str]:
    import httpx

    out = []
    for start in range(0, len(texts), BATCH):
        body = httpx.post(url + spec["path"], json=spec["body"](texts[start:start + BATCH]), timeout=120).json()
        out += [row["label"] for row in body["predictions"]]
    return out


def measure_server(name: str, spec: dict, facts: dict, args, logs: Path) -> dict:
    import httpx

    rows = []
    with running(spec, logs / f"{name.split()[0]}.log") as url:
        for texts in ([t] for t in facts["texts"][:20]):  # warm-up: first calls, lazy imports
            httpx.post(url + spec["path"], json=spec["body"](texts), timeout=120)
        labels = labels_of(url, spec, facts["texts"][:200]) if name != "pipeline + FastAPI" else None
        for clients in args.clients:
            requests = schedule(facts["texts"], args.singles, 0 if clients == 1 else args.batches, args.seed)
            before = store_rows(facts["store"]) if name == "tuneloop serve" else None
            row = asyncio.run(load(url, spec, requests, clients))
            if before is not None:
                time.sleep(0.5)  # the writer's last group commit
                row["store_new_rows"] = store_rows(facts["store"]) - before
            rows.append(row)
            print(f"  {name:20s} {clients:>2} clients: {row['requests_per_s']:6.1f} req/s "
                  f"{row['texts_per_s']:6.1f} texts/s p50 {row['single_p50_ms']:.0f} p99 "
                  f"{row['single_p99_ms']:.0f} ms {row['statuses']}"
                  + (f" store +{row['store_new_rows']} rows for {row['answered_texts']} texts"
                     if before is not None else ""), flush=True)
    return {"server": name, "runs": rows, "labels_200": labels}


def train_project(folder: Path) -> Path:
    """A scratch project on the shipped movie reviews, run once (`tuneloop run`)."""
    from benchmarks.recipe import prepare

    prepare("movies", folder)
    done = subprocess.run([str(BIN / "tuneloop"), "run"], cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"tuneloop run failed: {(done.stdout + done.stderr)[-2000:]}")
    return folder


def table(results: list[dict]) -> str:
    lines = ["| server | clients | req/s | texts/s | single p50 / p99 ms | non-200 | store rows / texts |",
             "|---|---:|---:|---:|---|---:|---|"]
    for server in results:
        for r in server["runs"]:
            bad = sum(v for k, v in r["statuses"].items() if k != "200")
            store = f"{r['store_new_rows']} / {r['answered_texts']}" if "store_new_rows" in r else "-"
            lines.append(f"| {server['server']} | {r['clients']} | {r['requests_per_s']:.1f} | "
                         f"{r['texts_per_s']:.1f} | {r['single_p50_ms']:.0f} / {r['single_p99_ms']:.0f} | "
                         f"{bad} | {store} |")
    return "\n".join(lines)


def ratios(results: list[dict]) -> list[str]:
    by = {s["server"]: {r["clients"]: r for r in s["runs"]} for s in results}
    ours = by.get("tuneloop serve", {})
    out = []
    for peer in (name for name in by if name != "tuneloop serve"):
        for clients, r in ours.items():
            if clients in by[peer]:
                ratio = r["requests_per_s"] / by[peer][clients]["requests_per_s"]
                out.append(f"{clients} clients: tuneloop serve {ratio:.2f}x "
                           f"the requests/s of {peer}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, help="a project folder with a champion (default: train one)")
    parser.add_argument("--singles", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--only", action="append", help="server name (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    where = machine()
    with tempfile.TemporaryDirectory(prefix="tuneloop-serve-load-") as scratch:
        project = args.project.resolve() if args.project else train_project(Path(scratch) / "movies")
        facts = project_facts(project)
        logs = Path(scratch)
        results = [measure_server(name, spec, facts, args, logs) for name, spec in servers(project, facts).items()
                   if not args.only or name in args.only]
    ours = next((r["labels_200"] for r in results if r["server"] == "tuneloop serve"), None)
    theirs = next((r["labels_200"] for r in results if r["server"] == "mlflow models serve"), None)
    agreement = (float(np.mean([a == b for a, b in zip(ours, theirs)])) if ours and theirs else None)
    print(f"\n{where['cpu']}, {where['cores']} cores, torch {where['torch']}\n\n{table(results)}\n")
    for line in ratios(results):
        print(line)
    if agreement is not None:
        print(f"tuneloop serve and mlflow models serve agree on {agreement:.1%} of 200 labels")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"serve-load-{datetime.now(timezone.utc):%Y-%m-%d}.json"
    for r in results:
        r.pop("labels_200", None)
    out.write_text(json.dumps({"machine": where, "singles": args.singles, "batches": args.batches,
                               "tuneloop_serve": facts["serve"],
                               "label_agreement_with_mlflow": agreement, "results": results}, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
