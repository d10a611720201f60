from __future__ import annotations

import threading

import pytest

from kv_transfer.lease import Lease, LeaseNotFound, LeaseState, LeaseTable

pytestmark = pytest.mark.timeout(30)


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def make_lease(request_id: str = "r", deadline_s: float = 101.0) -> Lease:
    return Lease(request_id, 7, (4, 9, 2), num_cached_blocks=1, num_layers=2, deadline_s=deadline_s)


def test_complete_when_every_layer_has_every_sent_block():
    lease = make_lease()
    assert lease.num_blocks_to_send == 2 and not lease.is_complete
    lease.mark_received(0, 1, 2)
    lease.mark_received(0, 1, 2)  # idempotent
    lease.mark_received(1, 1, 1)
    assert not lease.is_complete
    lease.mark_received(1, 2, 1)
    assert lease.is_complete


def test_expire_due_ends_only_overdue_leases():
    clock = FakeClock()
    freed: list[str] = []
    table = LeaseTable(on_expire=lambda lease: freed.append(lease.request_id), clock=clock)
    a, b = make_lease("a", 101.0), make_lease("b", 105.0)
    table.add(a)
    table.add(b)
    assert table.expire_due() == [] and len(table) == 2
    clock.now_s = 102.0
    assert table.expire_due() == [a]
    assert freed == ["a"] and a.state is LeaseState.EXPIRED and len(table) == 1
    with pytest.raises(LeaseNotFound):
        table.get("a", 7)
    with pytest.raises(LeaseNotFound):
        table.get("b", 8)  # wrong epoch
    assert table.get("b", 7) is b
    assert table.next_deadline_s() == 105.0


def test_end_happens_once():
    table = LeaseTable(on_expire=lambda lease: None)
    lease = make_lease()
    table.add(lease)
    with pytest.raises(ValueError, match="already has an active reservation"):
        table.add(make_lease())
    with lease.lock:
        assert table.end(lease, LeaseState.COMMITTED)
        assert not table.end(lease, LeaseState.ABORTED)
    assert lease.state is LeaseState.COMMITTED and len(table) == 0


def test_sweeper_expires_at_the_deadline():
    import time

    expired = threading.Event()
    table = LeaseTable(on_expire=lambda lease: expired.set())
    table.add(make_lease(deadline_s=time.monotonic() + 0.05))
    table.start_sweeper()
    try:
        assert expired.wait(2.0)
        assert len(table) == 0
    finally:
        table.stop_sweeper()
