"""Creating generations through the relay: what the proxy costs, and what it holds.

Separate processes on loopback: the upstream simulator, relay nodes (`--role all`,
RELAY_RATE_LIMIT=0, private callbacks allowed) and a callback receiver.

1. Overhead: 2,000 creates (quick: 300), each sent once straight to the simulator and once
   through the relay, interleaved and one at a time, so both see the same machine: p50 and
   p99 of each, and the difference (target: +5 ms at p50, +20 ms at p99). Then the same
   through the relay with a new Idempotency-Key on each (the key's claim and settle cost).
2. The commit window: `Server-Timing: commit` of those answers, the time from the upstream's
   answer to the committed subscription (and key): the window in which a crash loses a
   paid generation (README).
3. A 50 MiB multipart upload (quick: 20 MiB), streamed: byte-exact at the simulator
   (sha256), and the relay's RSS growth while it passes (target: under 20 MiB).
4. 100 concurrent requests with one Idempotency-Key: creates counted at the simulator
   (target: exactly 1).
5. RELAY_UPSTREAM_SSE=true: 200 image creates (quick: 50) finishing within seconds, each
   followed on its stream: per-id polls before the final GET (target: 0); and 5,000 open
   streams (quick: 500) of long videos: the relay's RSS (target: under 150 MiB in all).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from bench.common import Results, drop_database, new_database
from bench.e2e import machine_load, relay_env, wait_for_arrivals
from bench.harness import cluster, create_key
from bench.loadgen import percentile

SIMULATOR_KEY = "sim-proxy-key"
CALLBACK = "http://127.0.0.1:9/never"  # generations of parts 1-4 never finish in the run
IMAGE, VIDEO = "/v1/generation/flux/dev", "/v1/generation/kling-ai/o3/video"
BODY = b'{"prompt": "a cat in a hat", "aspect_ratio": "1:1"}'
MiB = 2**20


def _headers(api_key: str, **extra: str) -> dict[str, str]:
    return {
        "authorization": f"Bearer {api_key}",
        "content-type": "application/json",
        "relay-callback-url": CALLBACK,
        **extra,
    }


async def _timed_post(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], data: Any = BODY
) -> tuple[float, aiohttp.ClientResponse, bytes]:
    started = time.perf_counter()
    async with session.post(url, data=data, headers=headers) as response:
        body = await response.read()
    elapsed_s = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"{url} answered {response.status}: {body[:300]!r}")
    return elapsed_s, response, body


def _commit_ms(response: aiohttp.ClientResponse) -> float:
    timing = response.headers["server-timing"]
    return float(timing.split("commit;dur=")[1].split(",")[0])


def _p(values: list[float], scale: float = 1000.0) -> str:
    return f"{percentile(values, 0.5) * scale:.1f} / {percentile(values, 0.99) * scale:.1f}"


async def _overhead(
    results: Results, db: str, sim_url: str, relay_url: str, api_key: str, count: int
) -> None:
    sim_headers = {"authorization": f"Bearer {SIMULATOR_KEY}", "content-type": "application/json"}
    direct, relayed, keyed, commits, keyed_commits = [], [], [], [], []
    async with aiohttp.ClientSession() as session:
        for _ in range(20):  # warm both paths: connections, caches, the first statements
            await _timed_post(session, sim_url + IMAGE, sim_headers)
            await _timed_post(session, relay_url + IMAGE, _headers(api_key))
        for _ in range(count):
            direct.append((await _timed_post(session, sim_url + IMAGE, sim_headers))[0])
            elapsed_s, response, _ = await _timed_post(
                session, relay_url + IMAGE, _headers(api_key)
            )
            relayed.append(elapsed_s)
            commits.append(_commit_ms(response) / 1000)
        for _ in range(count // 2):
            headers = _headers(api_key, **{"idempotency-key": str(uuid.uuid4())})
            elapsed_s, response, _ = await _timed_post(session, relay_url + IMAGE, headers)
            keyed.append(elapsed_s)
            keyed_commits.append(_commit_ms(response) / 1000)
    note = f"{count} sequential creates, {machine_load()}"
    results.add("proxy", db, "create direct p50 / p99 (ms)", _p(direct), note)
    results.add("proxy", db, "create through relay p50 / p99 (ms)", _p(relayed))
    over_p50 = (percentile(relayed, 0.5) - percentile(direct, 0.5)) * 1000
    over_p99 = (percentile(relayed, 0.99) - percentile(direct, 0.99)) * 1000
    results.add(
        "proxy", db, "overhead p50 / p99 (ms)", f"{over_p50:.1f} / {over_p99:.1f}", "target 5 / 20"
    )
    results.add(
        "proxy", db, "with Idempotency-Key p50 / p99 (ms)", _p(keyed), f"{count // 2} creates"
    )
    results.add(
        "proxy", db, "commit window p50 / p99 (ms)", _p(commits), "upstream answer -> committed"
    )
    results.add("proxy", db, "commit window, with key p50 / p99 (ms)", _p(keyed_commits))


class _RssPeak:
    """The highest RSS of a process, sampled every few ms on a thread while it runs."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.base = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> _RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


async def _upload(
    results: Results, db: str, sim_url: str, relay_url: str, api_key: str, pid: int, size: int
) -> None:
    boundary = "bench-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="video"; filename="in.mp4"\r\n'
        "Content-Type: video/mp4\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    block = hashlib.sha256(b"relay").digest() * 8192  # 256 KiB
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for part in (head, *[block] * (size // len(block)), tail):
            digest.update(part)
            yield part

    headers = _headers(api_key, **{"content-type": f"multipart/form-data; boundary={boundary}"})
    async with aiohttp.ClientSession() as session:
        await _timed_post(session, relay_url + IMAGE, _headers(api_key))  # warm
        with _RssPeak(pid) as rss:
            elapsed_s, _, _ = await _timed_post(session, relay_url + VIDEO, headers, body())
        async with session.get(sim_url + "/_fake/creates") as response:
            last = (await response.json())["items"][-1]
    exact = last["sha256"] == digest.hexdigest() and last["bytes"] == size + len(head + tail)
    growth_mib = (rss.peak - rss.base) / MiB
    results.add(
        "proxy",
        db,
        f"{size // MiB} MiB multipart upload: relay RSS growth (MiB)",
        f"{growth_mib:.1f}",
        f"byte-exact: {'yes' if exact else 'NO'}, {elapsed_s:.1f} s, target < 20",
    )


async def _same_key(results: Results, db: str, sim_url: str, relay_url: str, api_key: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.put(sim_url + "/_fake/faults", json={"create_latency_s": 0.2}):
            pass
        async with session.get(sim_url + "/_fake/stats") as response:
            before = (await response.json())["create_total"]
        headers = _headers(api_key, **{"idempotency-key": "bench-same-key"})
        answers = await asyncio.gather(
            *(_timed_post(session, relay_url + IMAGE, headers) for _ in range(100))
        )
        async with session.get(sim_url + "/_fake/stats") as response:
            after = (await response.json())["create_total"]
        async with session.put(sim_url + "/_fake/faults", json={"create_latency_s": 0.0}):
            pass
    subscriptions = {r.headers["relay-subscription-id"] for _, r, _ in answers}
    results.add(
        "proxy",
        db,
        "100 concurrent requests, one key: upstream creates",
        str(after - before),
        f"{len(answers)} answered 200, {len(subscriptions)} subscription; target 1",
    )


async def _sse_polls(
    results: Results, db: str, sim_url: str, relay_url: str, receiver_url: str, api_key: str, n: int
) -> None:
    async with aiohttp.ClientSession() as session:
        ids = []
        for i in range(n):
            headers = _headers(api_key)
            headers["relay-callback-url"] = f"{receiver_url}/sse/{i}"
            _, _, body = await _timed_post(session, relay_url + IMAGE, headers)
            ids.append(orjson.loads(body)["id"])
        arrivals = await wait_for_arrivals(session, receiver_url, n, time.monotonic() + 120)
        early, total = 0, 0
        for gen_id in ids:
            async with session.get(f"{sim_url}/_fake/generations/{gen_id}/polls") as response:
                polls = await response.json()
            total += polls["count"]
            early += sum(1 for t in polls["times"] if t < polls["final_at"])
    results.add(
        "proxy",
        db,
        "SSE: per-id polls before the final GET",
        str(early),
        f"{n} generations, {len(arrivals)} callbacks, {total / n:.2f} polls each; target 0",
    )


async def _sse_memory(
    results: Results, db: str, relay_url: str, api_key: str, pid: int, database_url: str, n: int
) -> None:
    process = psutil.Process(pid)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as session:
        for _ in range(20):
            await _timed_post(session, relay_url + IMAGE, _headers(api_key))
        await asyncio.sleep(1)
        base = process.memory_info().rss
        gate = asyncio.Semaphore(50)

        async def one() -> None:
            async with gate:
                await _timed_post(session, relay_url + VIDEO, _headers(api_key))

        started = time.monotonic()
        await asyncio.gather(*(one() for _ in range(n)))
        elapsed_s = time.monotonic() - started
        await asyncio.sleep(3)
        rss = process.memory_info().rss
    engine = create_async_engine(database_url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            query = "SELECT count(*) FROM generations WHERE lease_owner LIKE '%/sse'"
            leased = (await conn.execute(text(query))).scalar_one()
    finally:
        await engine.dispose()
    per_stream_kib = (rss - base) / max(1, n) / 1024
    results.add(
        "proxy",
        db,
        f"SSE: relay RSS with {n} open streams (MiB)",
        f"{rss / MiB:.0f}",
        f"{base / MiB:.0f} before, {per_stream_kib:.1f} KiB per stream, {leased} leased, "
        f"opened in {elapsed_s:.0f} s; target < 150",
    )


FULL = (2000, 50 * MiB, 200, 5000)  # creates, upload bytes, SSE generations, open streams
QUICK = (300, 20 * MiB, 50, 500)


def run(results: Results, database: str, workdir: Path, quick: bool) -> None:
    run_sizes(results, database, workdir, *(QUICK if quick else FULL))


def run_sizes(
    results: Results,
    database: str,
    workdir: Path,
    count: int,
    upload: int,
    sse_n: int,
    streams: int,
) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    urls = [new_database(database, workdir) for _ in range(3)]
    try:
        keys = [create_key(url, "proxy")["api_key"] for url in urls]
        with cluster(workdir / f"proxy-{database}") as c:
            slow = c.fake_upstream(SIMULATOR_KEY, seed=3, time_scale=100.0)
            plain = c.relay("relay-plain", relay_env(urls[0], slow.url, SIMULATOR_KEY)).start()
            asyncio.run(_overhead(results, database, slow.url, plain.url, keys[0], count))
            asyncio.run(_upload(results, database, slow.url, plain.url, keys[0], plain.pid, upload))
            asyncio.run(_same_key(results, database, slow.url, plain.url, keys[0]))
            plain.kill()

            fast = c.fake_upstream(SIMULATOR_KEY, seed=4, time_scale=0.2)
            receiver = c.receiver()
            sse_env = relay_env(
                urls[1],
                fast.url,
                SIMULATOR_KEY,
                RELAY_UPSTREAM_SSE="true",
                RELAY_POLL_MIN_INTERVAL="0.5",
                RELAY_POLL_MAX_INTERVAL="2",
                RELAY_LEASE="5",
            )
            followed = c.relay("relay-sse", sse_env).start()
            asyncio.run(
                _sse_polls(results, database, fast.url, followed.url, receiver.url, keys[1], sse_n)
            )
            followed.kill()

            many_env = relay_env(urls[2], slow.url, SIMULATOR_KEY, RELAY_UPSTREAM_SSE="true")
            many = c.relay("relay-streams", many_env).start()
            asyncio.run(
                _sse_memory(results, database, many.url, keys[2], many.pid, urls[2], streams)
            )
    finally:
        for url in urls:
            drop_database(url)
