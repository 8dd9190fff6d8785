"""Probes of ``benchmarks/load.py``: short answers alone and beside long compressions, refusals."""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from urllib.parse import urlparse

import httpx

from gmsa.serving.metrics import percentile


def long_text(passages: list[tuple[str, str]], chars: int, tag: str) -> str:
    """A text of about ``chars`` characters made of passages, unique by ``tag`` (so it is never deduplicated)."""
    parts, size, i = [f"Document {tag}."], 0, 0
    while size < chars:
        parts.append(passages[i % len(passages)][0])
        size += len(parts[-1]) + 1
        i += 1
    return " ".join(parts)[:chars]


async def short_answers(http: httpx.AsyncClient, context_id: str, question: str, count: int, max_new: int) -> list:
    """``count`` answers one after another; (status, seconds) of each."""
    results = []
    for _ in range(count):
        started = time.perf_counter()
        response = await http.post(
            "/v1/answers", json={"context_id": context_id, "question": question, "max_new_tokens": max_new}
        )
        results.append((response.status_code, time.perf_counter() - started))
    return results


async def long_client(url: str, headers: dict, texts: list[str], rate: int, stop: asyncio.Event, log: list) -> None:
    """Compress ``texts`` (all in one request) again and again until ``stop``; the last request is abandoned."""
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers) as http:
        round_ = 0
        while not stop.is_set():
            body = {"texts": [f"{text} (round {round_})" for text in texts], "rate": rate}
            request = asyncio.ensure_future(http.post("/v1/contexts", json=body))
            started = time.perf_counter()
            await asyncio.wait([request, asyncio.ensure_future(stop.wait())], return_when="FIRST_COMPLETED")
            if not request.done():  # stopped: disconnect, the server should stop its work
                request.cancel()
                log.append({"status": "abandoned", "seconds": round(time.perf_counter() - started, 2)})
                return
            response = request.result()
            entry = {"status": response.status_code, "seconds": round(time.perf_counter() - started, 2)}
            if response.status_code == 200:
                entry["n_tokens"] = [c["n_tokens"] for c in response.json()["contexts"]]
                entry["contexts"] = {c["id"]: c for c in response.json()["contexts"]}
            log.append(entry)
            round_ += 1


def unauthenticated_flood(url: str, size: int = 8 * 2**20) -> dict:
    """Declare an ``size``-byte body without a key and send only its first 64 KiB: the answer must not wait for it."""
    parts = urlparse(url)
    started = time.perf_counter()
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        head = f"POST /v1/contexts HTTP/1.1\r\nHost: {parts.hostname}\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {size}\r\n\r\n".encode() + b"x" * 65536)
        status_line = sock.recv(4096).split(b"\r\n", 1)[0].decode()
    return {"status_line": status_line, "seconds": round(time.perf_counter() - started, 3), "declared_bytes": size}


def lat(results: list) -> dict:
    ok = [seconds for status, seconds in results if status == 200]
    return {
        "requests": len(results),
        "ok": len(ok),
        "p50_s": round(percentile(ok, 50), 3),
        "p95_s": round(percentile(ok, 95), 3),
        "max_s": round(max(ok, default=0), 3),
    }


async def probes(url: str, headers: dict, passages: list[tuple[str, str]], args: argparse.Namespace) -> dict:
    """Short answers alone and beside long compressions; a long question; an unauthenticated 8 MB body."""
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, headers=headers) as http:
        context, question = passages[0]
        created = await http.post("/v1/contexts", json={"text": context, "rate": args.rate})
        summary = created.json()["contexts"][0]
        await short_answers(http, summary["id"], question, 1, args.max_new_tokens)  # warm-up
        alone, beside, long_log = [], [], []
        for round_ in range(args.probe_rounds):  # alternate, so that the machine's load drifts into both
            alone += await short_answers(http, summary["id"], question, args.probe_repeats, args.max_new_tokens)
            stop = asyncio.Event()
            texts = [
                long_text(passages[i:] + passages[:i], args.long_chars, f"probe-{round_}-{i}")
                for i in range(args.long_texts)
            ]
            long_task = asyncio.create_task(long_client(url, headers, texts, args.rate, stop, long_log))
            await asyncio.sleep(args.long_head_start)
            beside += await short_answers(http, summary["id"], question, args.probe_repeats, args.max_new_tokens)
            stop.set()
            await long_task
        question_text = long_text(passages, args.long_question_chars, "question")
        started = time.perf_counter()
        refused = await http.post("/v1/answers", json={"context_id": summary["id"], "question": question_text})
        long_question = {
            "chars": len(question_text),
            "status": refused.status_code,
            "seconds": round(time.perf_counter() - started, 3),
            "detail": str(refused.json().get("detail"))[:160],
        }
    alone_lat, beside_lat = lat(alone), lat(beside)
    bound = 3 * alone_lat["p50_s"] + 2
    return {
        "short_context": summary,
        "alone": alone_lat,
        "beside_long": beside_lat,
        "bound_s": round(bound, 3),
        "holds": beside_lat["p50_s"] <= bound and beside_lat["p95_s"] <= 3 * alone_lat["p95_s"] + 2,
        "long_requests": [{k: v for k, v in entry.items() if k != "contexts"} for entry in long_log],
        "long_contexts": {i: c for entry in long_log for i, c in entry.get("contexts", {}).items()},
        "long_question": long_question,
        "unauthenticated_8mb": unauthenticated_flood(url),
        "errors": [s for s, _ in alone + beside if s != 200],
    }


def probes_markdown(probed: dict) -> list[str]:
    alone, beside = probed["alone"], probed["beside_long"]
    longs = probed["long_requests"]
    tokens = sorted({n for entry in longs for n in entry.get("n_tokens", [])})
    question, flood = probed["long_question"], probed["unauthenticated_8mb"]
    verdict = "holds" if probed["holds"] else "does NOT hold"
    return [
        "## Short answers beside long compressions",
        "",
        "| short answer (stored context) | requests | ok | p50 s | p95 s | max s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| alone | {alone['requests']} | {alone['ok']} | {alone['p50_s']} | {alone['p95_s']} | {alone['max_s']} |",
        f"| beside long compressions | {beside['requests']} | {beside['ok']} | {beside['p50_s']} | {beside['p95_s']} "
        f"| {beside['max_s']} |",
        "",
        f"Ratio p50 beside / alone: {beside['p50_s'] / max(alone['p50_s'], 1e-9):.2f}; bound 3 x alone + 2 s = "
        f"{probed['bound_s']} s (p50; and the same on p95): **{verdict}**.",
        f"Long requests meanwhile: {len(longs)} ({', '.join(str(e['status']) for e in longs)}; texts of "
        f"{tokens[:1] + tokens[-1:] if tokens else '?'} tokens; seconds {[e['seconds'] for e in longs]}); the last one "
        "was abandoned by its client when the probe ended.",
        f"A {question['chars']}-character question: {question['status']} in {question['seconds']} s "
        f"({question['detail']}).",
        f"An unauthenticated 8 MB body (only 64 KiB sent): `{flood['status_line']}` in {flood['seconds']} s.",
        f"Errors in the probes: {len(probed['errors'])}.",
        "",
    ]
