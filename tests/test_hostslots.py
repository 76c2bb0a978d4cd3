"""HostSlots, the per-host arithmetic of delivery: pure, so a fake clock and a fixed draw."""

from __future__ import annotations

import pytest

from relay.hostslots import DEFER_MAX_S, DEFER_MIN_S, HostSlots, Offer
from tests.helpers import constant

HOST = "hooks.example:443"
OTHER = "other.example:443"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def slots(per_host: int = 2, draw: float = 0.5) -> tuple[HostSlots[str], FakeClock]:
    """Slots with no jitter (a draw of 0.5 multiplies by exactly 1.0) and a fake clock."""
    clock = FakeClock()
    return HostSlots(per_host, clock=clock, rand=constant(draw)), clock


def fill(hosts: HostSlots[str], host: str, count: int) -> list[Offer]:
    return [hosts.offer(host, f"{host}#{i}") for i in range(count)]


def test_a_host_gets_at_most_per_host_slots() -> None:
    """Up to `per_host` items of a host start at once; the next waits; other hosts still start."""
    hosts, _ = slots(per_host=2)
    assert fill(hosts, HOST, 3) == [Offer.START, Offer.START, Offer.WAIT]
    assert hosts.in_use(HOST) == 2
    assert hosts.offer(OTHER, "o") is Offer.START
    assert hosts.in_use(OTHER) == 1


def test_the_waiting_queue_is_bounded_and_the_rest_is_surplus() -> None:
    """At most `per_host` wait per host; beyond that every offer is surplus and is not kept."""
    hosts, _ = slots(per_host=2)
    offers = fill(hosts, HOST, 6)
    assert offers == [Offer.START] * 2 + [Offer.WAIT] * 2 + [Offer.SURPLUS] * 2
    assert hosts.waiting_count == 2
    assert hosts.waiting() == [f"{HOST}#2", f"{HOST}#3"]
    # Another host's queue is its own.
    assert fill(hosts, OTHER, 3) == [Offer.START, Offer.START, Offer.WAIT]
    assert hosts.waiting_count == 3


def test_release_hands_the_slot_to_the_next_waiting_item_in_order() -> None:
    """A release starts the host's oldest waiting item, which keeps the slot; with nobody
    waiting the slot is freed for the next offer."""
    hosts, _ = slots(per_host=2)
    fill(hosts, HOST, 4)
    assert hosts.release(HOST, 0.1) == f"{HOST}#2"
    assert hosts.in_use(HOST) == 2 and hosts.waiting_count == 1
    assert hosts.release(HOST, 0.1) == f"{HOST}#3"
    assert hosts.in_use(HOST) == 2 and hosts.waiting_count == 0
    assert hosts.waiting() == []
    assert hosts.release(HOST, 0.1) is None
    assert hosts.in_use(HOST) == 1
    assert hosts.offer(HOST, "again") is Offer.START


def test_latency_is_a_moving_average_of_durations() -> None:
    """The first duration is the average; each next one weighs 0.2; a release without a
    duration (the send raised) leaves it as it was."""
    hosts, _ = slots(per_host=4)
    fill(hosts, HOST, 4)
    assert hosts.latency_s(HOST) is None
    hosts.release(HOST, 1.0)
    assert hosts.latency_s(HOST) == pytest.approx(1.0)
    hosts.release(HOST, 2.0)
    assert hosts.latency_s(HOST) == pytest.approx(0.8 * 1.0 + 0.2 * 2.0)
    hosts.release(HOST, None)
    assert hosts.latency_s(HOST) == pytest.approx(1.2)


def test_defer_is_the_time_the_hosts_queue_takes_to_drain() -> None:
    """defer_s = (in use + waiting) / per_host x average latency: a full queue of a host
    answering in 3 s (4 in use, 4 waiting, per_host 4) is deferred 6 s."""
    hosts, _ = slots(per_host=4)
    fill(hosts, HOST, 9)
    # Latency 3 s from one release; its slot went to a waiting item, so still 4 + 3.
    hosts.release(HOST, 3.0)
    assert hosts.defer_s(HOST) == pytest.approx((4 + 3) / 4 * 3.0)
    assert hosts.offer(HOST, "x") is Offer.WAIT
    assert hosts.defer_s(HOST) == pytest.approx((4 + 4) / 4 * 3.0)


def test_a_stuck_host_is_deferred_longer_the_longer_it_is_stuck() -> None:
    """A host at its limit that finishes nothing is judged by how long it has been stuck:
    at least that long per queue's worth, so its delay doubles as its stuck time doubles."""
    hosts, clock = slots(per_host=2)
    saturated_at = clock.now
    assert fill(hosts, HOST, 5)[-1] is Offer.SURPLUS  # 2 in use, 2 waiting, a surplus
    clock.now = saturated_at + 1.0
    first = hosts.defer_s(HOST)
    assert first == pytest.approx(4 / 2 * 1.0)
    clock.now = saturated_at + 2.0
    assert hosts.defer_s(HOST) == pytest.approx(2 * first)
    clock.now = saturated_at + 4.0
    assert hosts.defer_s(HOST) == pytest.approx(4 * first)


def test_stuck_time_never_lowers_a_known_latency() -> None:
    """A slow host that just answered is judged by its average, not the short stuck time."""
    hosts, clock = slots(per_host=2)
    fill(hosts, HOST, 4)
    clock.now += 5.0
    hosts.release(HOST, 5.0)  # its slot goes to a waiting item: at the limit again, now
    clock.now += 0.5
    assert hosts.defer_s(HOST) == pytest.approx(3 / 2 * 5.0)


def test_a_release_restarts_the_stuck_clock() -> None:
    """Saturation counts from the last time a slot was taken at the limit, not the first."""
    hosts, clock = slots(per_host=1)
    fill(hosts, HOST, 2)
    clock.now += 10.0
    # The send raised (no duration): the next waiting item takes the slot, stuck from now.
    assert hosts.release(HOST, None) == f"{HOST}#1"
    clock.now += 2.0
    assert hosts.defer_s(HOST) == pytest.approx(1 / 1 * 2.0)


def test_an_idle_host_is_forgotten() -> None:
    """A host with nothing in flight and nothing waiting loses its average: when it comes
    back it is judged afresh (here by its stuck time alone)."""
    hosts, clock = slots(per_host=1)
    fill(hosts, HOST, 1)
    hosts.release(HOST, 30.0)
    assert hosts.latency_s(HOST) is None
    assert hosts.in_use(HOST) == 0
    fill(hosts, HOST, 2)
    clock.now += 2.0
    assert hosts.defer_s(HOST) == pytest.approx(2 / 1 * 2.0)
    # While a host still has work, its average is kept.
    hosts.release(HOST, 1.0)
    assert hosts.latency_s(HOST) == pytest.approx(1.0)


def test_defer_is_bounded_and_jittered() -> None:
    """The delay is at least DEFER_MIN_S and at most DEFER_MAX_S, then jittered by +/-20%."""
    fresh, _ = slots(per_host=2, draw=0.5)
    fill(fresh, HOST, 1)  # not saturated, no latency: nothing to drain
    assert fresh.defer_s(HOST) == pytest.approx(DEFER_MIN_S)
    stuck, clock = slots(per_host=2, draw=0.5)
    fill(stuck, HOST, 4)
    clock.now += 3600.0
    assert stuck.defer_s(HOST) == pytest.approx(DEFER_MAX_S)
    low, _ = slots(draw=0.0)
    high, _ = slots(draw=1.0)
    fill(low, HOST, 1)
    fill(high, HOST, 1)
    assert low.defer_s(HOST) == pytest.approx(0.8 * DEFER_MIN_S)
    assert high.defer_s(HOST) == pytest.approx(1.2 * DEFER_MIN_S)


def test_take_waiting_empties_every_queue() -> None:
    """Closing takes every waiting item of every host; a later release starts nothing."""
    hosts, _ = slots(per_host=1)
    fill(hosts, HOST, 2)
    fill(hosts, OTHER, 2)
    assert sorted(hosts.take_waiting()) == [f"{HOST}#1", f"{OTHER}#1"]
    assert hosts.waiting_count == 0 and hosts.waiting() == []
    assert hosts.release(HOST, 0.1) is None
    assert hosts.offer(HOST, "after") is Offer.START
