"""Load test of ``gmsa serve`` on loopback: fairness probes, then concurrent clients mixing requests.

    nice -n 10 python benchmarks/load.py --untrained-k-enc 4 --clients 8 --requests 160

Probes first (one client at a time): the latency of a short answer alone and beside a long
compression (``--long-texts`` texts of ~``--long-chars`` characters each, sent back to back by
another client), a ~8k-token question (must be refused fast), and an unauthenticated 8 MB body
(must be refused without being read). Then the mix, which includes long compressions
(``--long-fraction``).

Starts a server (a child process on 127.0.0.1, fresh store, API key ``--api-key`` or a random one,
passed in its environment) unless ``--url`` names one already running on loopback; sends a fixed
number of requests from ``--clients`` concurrent clients and stops by itself (``--max-seconds``).
Reports throughput, p50/p99 latency per kind, errors, the server's batching, and then checks every
context the clients stored: the API serves its metadata, and, once the server has stopped, the
store re-reads every blob against its checksum and passes ``PRAGMA integrity_check`` (contexts
lost must be 0). Results go to ``reports/serve/``.

Model: ``--model DIR`` (a GMSA checkpoint), or ``--untrained-k-enc K`` to write an untrained
checkpoint on the default backbone (``GMSA.from_backbone("default", GMSAConfig(k_enc=K))``), or
neither for the shipped checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from gmsa.serving.metrics import percentile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_probes import long_text, probes, probes_markdown  # noqa: E402 - a sibling script module

REPO = Path(__file__).resolve().parents[1]
FALLBACK_PASSAGES = [
    (
        "The Amazon basin was split along the middle of the continent by the Purus Arch. Water on the eastern "
        "side flowed toward the Atlantic, while to the west it flowed toward the Pacific.",
        "Which arch split the basin?",
    ),
    (
        "Group merging averages the hidden states of consecutive tokens, so a context of n tokens becomes "
        "n divided by the rate soft tokens that the frozen decoder reads in place of the text.",
        "What does group merging average?",
    ),
    (
        "Paris is the capital of France and its largest city. It lies on the Seine and has been a centre of "
        "finance, diplomacy, commerce, fashion and science for centuries.",
        "Which river does Paris lie on?",
    ),
]


@dataclass
class Outcome:
    kind: str
    status: int
    seconds: float
    server_timings: dict = field(default_factory=dict)
    error: str = ""


# --------------------------------------------------------------------- workload
def load_passages(path: Path, count: int, seed: int) -> list[tuple[str, str]]:
    """(context, question) pairs: a sample of a QA jsonl file, or a few built-in passages."""
    if not path.is_file():
        return FALLBACK_PASSAGES
    rows = [json.loads(line) for line in path.open(encoding="utf-8")]
    rows = [r for r in rows if 200 <= len(r["context"]) <= 2000]
    random.Random(seed).shuffle(rows)
    return [(r["context"], r["question"]) for r in rows[:count]]


class Workload:
    """Deterministic request mix: a share of long compressions, then compress 40%, answer by stored id
    40%, answer from raw text 20% of the rest."""

    def __init__(
        self,
        passages: list[tuple[str, str]],
        total: int,
        seed: int,
        rate: int,
        max_new_tokens: int,
        long_fraction: float = 0.0,
        long_chars: int = 30_000,
    ):
        self.passages = passages
        self.remaining = total
        self.random = random.Random(seed)
        self.rate = rate
        self.max_new_tokens = max_new_tokens
        self.long_fraction = long_fraction
        self.long_chars = long_chars
        self.stored: dict[str, dict] = {}  # id -> summary returned by the server

    def next_request(self) -> tuple[str, str, dict] | None:
        if self.remaining <= 0:
            return None
        self.remaining -= 1
        if self.random.random() < self.long_fraction:
            text = long_text(self.passages, self.long_chars, f"mix-{self.remaining}")
            return "compress_long", "/v1/contexts", {"text": text, "rate": self.rate}
        roll = self.random.random()
        context, question = self.random.choice(self.passages)
        if roll < 0.4 or (roll < 0.8 and not self.stored):
            texts = [context] + ([self.random.choice(self.passages)[0]] if self.random.random() < 0.3 else [])
            return "compress", "/v1/contexts", {"texts": texts, "rate": self.rate}
        generation = {"max_new_tokens": self.max_new_tokens}
        if roll < 0.8:
            context_id = self.random.choice(sorted(self.stored))
            return "answer_stored", "/v1/answers", {"context_id": context_id, "question": question} | generation
        return "answer_text", "/v1/answers", {"text": context, "rate": self.rate, "question": question} | generation


async def client_loop(http: httpx.AsyncClient, workload: Workload, deadline: float, outcomes: list[Outcome]) -> None:
    """One client: send the workload's next request until it is exhausted or the deadline passes."""
    while time.monotonic() < deadline and (request := workload.next_request()) is not None:
        kind, path, body = request
        started = time.perf_counter()
        try:
            response = await http.post(path, json=body)
        except httpx.HTTPError as err:
            outcomes.append(Outcome(kind, 0, time.perf_counter() - started, error=f"{type(err).__name__}: {err}"))
            continue
        seconds = time.perf_counter() - started
        payload = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        error = "" if response.status_code == 200 else str(payload.get("detail", response.text))[:200]
        outcomes.append(Outcome(kind, response.status_code, seconds, payload.get("timings", {}), error))
        if kind.startswith("compress") and response.status_code == 200:
            workload.stored.update({c["id"]: c for c in payload["contexts"]})


async def run_clients(
    url: str, workload: Workload, clients: int, max_seconds: float, timeout: float, headers: dict
) -> tuple:
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + max_seconds
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, headers=headers) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(http, workload, deadline, outcomes) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return outcomes, elapsed


# --------------------------------------------------------------------- server
def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"refusing to load-test {url}: only loopback addresses (127.0.0.0/8, ::1, localhost)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def untrained_checkpoint(k_enc: int, directory: Path) -> Path:
    """Write an untrained GMSA on the default backbone as a checkpoint directory (once)."""
    if not (directory / "model.safetensors").is_file():
        from gmsa import GMSA, GMSAConfig
        from gmsa.evaluation.common import UNTRAINED_DEFAULTS

        config = GMSAConfig(**(UNTRAINED_DEFAULTS | {"k_enc": k_enc}))
        GMSA.from_backbone("default", config).save_pretrained(directory)
    return directory


def start_server(
    port: int, store: Path, model: Path | None, threads: int, extra: list[str], api_key: str
) -> subprocess.Popen:
    command = [sys.executable, "-m", "gmsa.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--store", str(store), "--threads", str(threads)] + (["--model", str(model)] if model else []) + extra
    return subprocess.Popen(command, cwd=REPO, env=os.environ | {"GMSA_API_KEY": api_key})


def wait_healthy(url: str, server: subprocess.Popen | None, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server at {url} was not healthy after {seconds:.0f} s")


def stop_server(server: subprocess.Popen) -> int:
    server.send_signal(signal.SIGTERM)
    try:
        return server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
        return server.wait()


# --------------------------------------------------------------------- checks and report
def check_via_api(url: str, stored: dict[str, dict], headers: dict) -> list[str]:
    """Every context the clients were given is served with the metadata they were given."""
    problems = []
    with httpx.Client(base_url=url, timeout=30, headers=headers) as http:
        for context_id, summary in sorted(stored.items()):
            response = http.get(f"/v1/contexts/{context_id}")
            if response.status_code != 200:
                problems.append(f"GET {context_id}: {response.status_code}")
                continue
            info = response.json()
            if (info["n_tokens"], info["n_soft_tokens"]) != (summary["n_tokens"], summary["n_soft_tokens"]):
                problems.append(f"{context_id}: metadata changed")
    return problems


def check_store(store: Path, stored: dict[str, dict]) -> dict:
    """Open the store after the server stopped: checksums of every blob, SQLite integrity, ids present."""
    from gmsa.serving.store import ContextStore

    with ContextStore(store) as opened:
        problems = opened.verify()
        missing = sorted(set(stored) - set(opened.ids()))
        return {
            "contexts": len(opened.ids()),
            "integrity_check": opened.integrity_check(),
            "blob_problems": problems,
            "missing_ids": missing,
            "intact": not problems and not missing and opened.integrity_check() == "ok",
        }


def summarize(outcomes: list[Outcome], elapsed: float) -> dict:
    def stats(group: list[Outcome]) -> dict:
        ok = [o.seconds for o in group if o.status == 200]
        batches = [o.server_timings["batch_items"] for o in group if o.server_timings.get("batch_items")]
        return {
            "requests": len(group),
            "ok": len(ok),
            "p50_ms": round(percentile(ok, 50) * 1000, 1),
            "p99_ms": round(percentile(ok, 99) * 1000, 1),
            "max_ms": round(max(ok, default=0) * 1000, 1),
            "ran_on_model": len(batches),  # the others were answered from the store (same text, rate, model)
            "mean_batch_items": round(sum(batches) / max(1, len(batches)), 2),
        }

    errors: dict[str, int] = {}
    for outcome in outcomes:
        if outcome.status != 200:
            key = f"{outcome.status} {outcome.error[:80]}"
            errors[key] = errors.get(key, 0) + 1
    kinds = sorted({o.kind for o in outcomes})
    return {
        "requests": len(outcomes),
        "elapsed_s": round(elapsed, 2),
        "throughput_rps": round(len(outcomes) / elapsed, 3),
        "all": stats(outcomes),
        "by_kind": {kind: stats([o for o in outcomes if o.kind == kind]) for kind in kinds},
        "errors": errors,
    }


def markdown(result: dict) -> str:
    config, summary = result["config"], result["summary"]
    lines = [
        f"# Load test: {config['label']}",
        "",
        f"- command: `{config['command']}`",
        *([f"- note: {config['note']}"] if config.get("note") else []),
        f"- model: {config['model']}; server threads: {config['threads']}; "
        f"{config['clients']} clients, {config['requests']} requests, max_new_tokens {config['max_new_tokens']}, "
        f"rate {config['rate']}",
        f"- {summary['requests']} requests in {summary['elapsed_s']} s: **{summary['throughput_rps']} req/s**, "
        f"errors: {sum(summary['errors'].values())}",
        "",
        "| kind | requests | ok | p50 ms | p99 ms | max ms | ran on the model | mean micro-batch items |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, row in [("all", summary["all"])] + list(summary["by_kind"].items()):
        lines.append(
            f"| {kind} | {row['requests']} | {row['ok']} | {row['p50_ms']} | {row['p99_ms']} | {row['max_ms']} "
            f"| {row['ran_on_model']} | {row['mean_batch_items']} |"
        )
    worker = result["server_metrics"].get("worker", {})
    store = result["store_check"]
    lost = len(store.get("missing_ids", [])) + len(store.get("blob_problems", []))
    lines += [
        "",
        f"Server worker: {worker.get('batches')} micro-batches, mean {worker.get('mean_batch_items')} items, "
        f"max {worker.get('max_batch_items')}, {worker.get('units')} units of work, {worker.get('cancelled')} "
        f"requests stopped early, busy {worker.get('busy_s')} s.",
        f"Integrity: API check problems {len(result['api_problems'])}; **contexts lost: {lost}**; "
        f"store {json.dumps(store)}.",
        "",
    ]
    if result.get("probes"):
        lines += probes_markdown(result["probes"])
    if summary["errors"]:
        lines += ["Errors:", ""] + [f"- {count} x {key}" for key, count in summary["errors"].items()] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an already running server on loopback (default: start one)")
    parser.add_argument("--model", type=Path, help="GMSA checkpoint directory for the started server")
    parser.add_argument("--untrained-k-enc", type=int, help="serve an untrained GMSA(k_enc=K) on the default backbone")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--max-seconds", type=float, default=480, help="stop sending after this long")
    parser.add_argument("--request-timeout", type=float, default=120)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the started server")
    parser.add_argument("--rate", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--passages", type=int, default=24, help="distinct contexts (repeats exercise dedup)")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "qa" / "test.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "serve")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `gmsa serve` option (repeat)")
    parser.add_argument("--note", default="", help="a line for the report")
    parser.add_argument("--keep", action="store_true", help="keep the temporary store and checkpoint")
    parser.add_argument("--api-key", help="the server's key (default: a random one for the started server)")
    parser.add_argument("--long-fraction", type=float, default=0.05, help="share of long compressions in the mix")
    parser.add_argument("--long-chars", type=int, default=30_000, help="characters per long text (~7k tokens)")
    parser.add_argument("--long-texts", type=int, default=6, help="long texts per probe compression request")
    parser.add_argument("--long-head-start", type=float, default=3.0, help="seconds the long probe runs first")
    parser.add_argument("--long-question-chars", type=int, default=24_000, help="the too-long question probe")
    parser.add_argument("--probe-repeats", type=int, default=5, help="short answers alone and beside, per round")
    parser.add_argument("--probe-rounds", type=int, default=2, help="rounds of alone-then-beside (0: no probes)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gmsa-load-"))
    model = untrained_checkpoint(args.untrained_k_enc, work / "checkpoint") if args.untrained_k_enc else args.model
    store, server = work / "store", None
    url = args.url or f"http://127.0.0.1:{free_port()}"
    require_loopback(url)
    api_key = args.api_key or secrets.token_urlsafe(24)
    headers = {"Authorization": f"Bearer {api_key}"}
    if args.url is None:
        server = start_server(urlparse(url).port, store, model, args.threads, args.server_arg, api_key)
    try:
        wait_healthy(url, server, 600)
        passages = load_passages(args.data, args.passages, args.seed)
        probed = asyncio.run(probes(url, headers, passages, args)) if args.probe_rounds else {}
        workload = Workload(
            passages, args.requests, args.seed, args.rate, args.max_new_tokens, args.long_fraction, args.long_chars
        )
        workload.stored.update(probed.get("long_contexts", {}))
        outcomes, elapsed = asyncio.run(
            run_clients(url, workload, args.clients, args.max_seconds, args.request_timeout, headers)
        )
        api_problems = check_via_api(url, workload.stored, headers)
        metrics = httpx.get(f"{url}/v1/stats", timeout=30, headers=headers).json()
    finally:
        exit_code = stop_server(server) if server is not None else None
    store_check = check_store(store, workload.stored) if server is not None else {"skipped": "external server"}
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    model_name = str(model or "shipped checkpoint")
    if args.untrained_k_enc:
        model_name = f"untrained GMSA.from_backbone('default', GMSAConfig(k_enc={args.untrained_k_enc}))"
    config = vars(args) | {"model": model_name, "command": " ".join(["python", *sys.argv]), "url": url}
    config["api_key"] = "(given)" if args.api_key else "(random)"
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in config.items()},
        "summary": summarize(outcomes, elapsed),
        "server_metrics": metrics,
        "server_exit_code": exit_code,
        "api_problems": api_problems,
        "store_check": store_check,
        "probes": {k: v for k, v in probed.items() if k != "long_contexts"},
        "outcomes": [asdict(o) for o in outcomes],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"load-{args.label}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"load-{args.label}.md").write_text(markdown(result))
    print(markdown(result))
    intact = not api_problems and store_check.get("intact", True)
    probes_ok = not probed or (probed["holds"] and not probed["errors"])
    return 0 if intact and probes_ok and not result["summary"]["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
