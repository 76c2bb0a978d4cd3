"""Token buckets: the upstream's request cap (with Retry-After pauses) and per-key limits."""

from __future__ import annotations

import asyncio
import time

import pytest

from relay.ratelimit import KeyedLimiter, TokenBucket


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_bucket_starts_full_and_then_says_how_long_to_wait() -> None:
    """`burst` tokens are there at once; then try_take says when the next one comes."""
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3.0, clock=clock)
    assert [bucket.try_take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_take() == pytest.approx(0.5)


def test_tokens_come_back_at_the_rate() -> None:
    """Half a token after 0.25 s at 2/s: a quarter second more to wait; then one is there."""
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=1.0, clock=clock)
    assert bucket.try_take() == 0.0
    clock.now += 0.25
    assert bucket.try_take() == pytest.approx(0.25)
    clock.now += 0.25
    assert bucket.try_take() == 0.0


def test_an_idle_bucket_holds_at_most_burst() -> None:
    """However long a bucket sits idle, it hands out no more than `burst` at once."""
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=2.0, clock=clock)
    bucket.try_take()
    clock.now += 3600.0
    assert [bucket.try_take() for _ in range(2)] == [0.0, 0.0]
    assert bucket.try_take() == pytest.approx(0.1)


def test_pause_hands_out_nothing_until_it_ends() -> None:
    """A pause (Retry-After) withholds tokens that are there; a shorter pause does not cut a
    longer one short; after it, tokens flow again."""
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, burst=5.0, clock=clock)
    bucket.pause(5.0)
    assert bucket.try_take() == pytest.approx(5.0)
    clock.now += 2.0
    bucket.pause(1.0)
    assert bucket.try_take() == pytest.approx(3.0)
    clock.now += 3.0
    assert bucket.try_take() == 0.0


async def test_take_waits_for_a_token_and_for_a_pause() -> None:
    """take() returns at once with a token, else sleeps until one comes or the pause ends."""
    bucket = TokenBucket(rate=50.0, burst=1.0)
    async with asyncio.timeout(5):
        started = time.monotonic()
        await bucket.take()
        assert time.monotonic() - started < 0.01
        await bucket.take()
        assert time.monotonic() - started >= 0.015  # 1/50 s, less timer slack
        bucket.pause(0.1)
        paused_at = time.monotonic()
        await bucket.take()
        assert time.monotonic() - paused_at >= 0.09


def test_each_key_has_its_own_bucket() -> None:
    """One key spending its burst does not limit another."""
    limiter = KeyedLimiter(rate=0.001, burst=1.0)
    assert limiter.check("a") == 0.0
    assert limiter.check("a") > 0.0
    assert limiter.check("b") == 0.0


def test_keys_beyond_max_keys_forget_the_least_recently_used() -> None:
    """Memory is bounded: past max_keys the least recently used key's bucket is dropped (it
    comes back full); a key just used is kept."""
    limiter = KeyedLimiter(rate=0.001, burst=1.0, max_keys=2)
    limiter.check("a")
    limiter.check("b")
    assert limiter.check("a") > 0.0  # "a" is now the most recently used
    limiter.check("c")  # one key too many: "b" goes
    assert limiter.check("a") > 0.0
    assert limiter.check("b") == 0.0  # a fresh, full bucket: it had been forgotten
    # "b" came back and pushed out the least recently used: "c" (then "a", used before it).
    assert limiter.check("c") == 0.0


def test_a_flood_of_keys_does_not_remember_them_all() -> None:
    """Ten thousand one-off keys past max_keys leave only the newest max_keys remembered."""
    limiter = KeyedLimiter(rate=0.001, burst=1.0, max_keys=10)
    for n in range(10_000):
        limiter.check(f"k{n}")
    assert all(limiter.check(f"k{n}") > 0.0 for n in range(9_990, 10_000))
    assert all(limiter.check(f"k{n}") == 0.0 for n in range(10))


def test_peek_says_what_check_would_without_taking() -> None:
    """peek answers like check but takes nothing, and makes no bucket for a new key."""
    limiter = KeyedLimiter(rate=1.0, burst=1.0)
    assert limiter.peek("a") == 0.0
    assert limiter.peek("a") == 0.0
    assert limiter.check("a") == 0.0
    assert limiter.peek("a") > 0
    assert limiter.check("a") > 0
