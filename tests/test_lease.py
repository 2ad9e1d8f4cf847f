"""The output lease (denseclip/lease.py) on local disk and on a real S3 API (moto): one holder at a time,
renewal, expiry and takeover, and a race of many takers."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from denseclip import storage
from denseclip.lease import LEASE_FILE, Lease, LeaseError, LeaseHeld, LeaseLost


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("make_bucket")("lease") + "/masks"


def _record(output: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(output, LEASE_FILE)))


def test_one_holder_at_a_time_and_the_refusal_names_it(output):
    with Lease(output, ttl_s=30) as first:
        record = _record(output)
        assert (record["holder"], record["host"], record["pid"]) == (first.holder, socket.gethostname(), os.getpid())
        assert record["expires"] > time.time() + 20
        with pytest.raises(LeaseHeld, match=f"holder {first.holder} on host {socket.gethostname()} "
                                            f"\\(pid {os.getpid()}\\)") as refused:
            Lease(output, ttl_s=30).acquire()
        assert refused.value.record["holder"] == first.holder
        first.check()
    assert _record(output)["released"] is True
    with Lease(output, ttl_s=30) as second:  # released: the next run takes it at once, as no takeover
        assert second.taken_over is None and _record(output)["holder"] == second.holder


def test_renewal_keeps_a_live_run_and_a_dead_run_is_taken_over(output):
    with Lease(output, ttl_s=0.9) as live:
        time.sleep(2.0)  # more than twice the lease: only renewal keeps it
        live.check()
        with pytest.raises(LeaseHeld):
            Lease(output, ttl_s=0.9).acquire()
    dead = Lease(output, ttl_s=0.5)
    dead.acquire()  # taken, never renewed nor released: a run killed with SIGKILL
    time.sleep(0.8)
    with pytest.raises(LeaseLost, match="expired"):
        dead.check()
    successor = Lease(output, ttl_s=30)
    successor.acquire()
    assert successor.taken_over["holder"] == dead.holder and _record(output)["holder"] == successor.holder
    with pytest.raises(LeaseLost, match="taken over"):
        dead.renew()  # the dead run's renewal cannot take the lease back
    dead.release()  # nor can its release
    assert _record(output)["holder"] == successor.holder
    successor.release()


def test_a_waiting_run_gets_the_lease_when_the_holder_releases_it(output):
    holder = Lease(output, ttl_s=30)
    holder.acquire()
    threading.Timer(1.0, holder.release).start()
    start = time.monotonic()
    with Lease(output, ttl_s=30, wait_s=60) as waiter:
        assert 0.8 < time.monotonic() - start < 30 and _record(output)["holder"] == waiter.holder


def test_of_many_racing_takers_exactly_one_wins(output):
    leases = [Lease(output, ttl_s=30) for _ in range(6)]
    results: dict[int, str] = {}
    barrier = threading.Barrier(len(leases))

    def take(i: int) -> None:
        barrier.wait()
        try:
            leases[i].acquire()
            results[i] = "won"
        except LeaseHeld:
            results[i] = "refused"

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(leases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in results.items() if r == "won"]
    assert len(winners) == 1 and len(results) == len(leases)
    assert _record(output)["holder"] == leases[winners[0]].holder


def test_outputs_without_conditional_writes_are_refused():
    with pytest.raises(LeaseError, match="local disk and S3 only"):
        Lease("memory://bucket/out")


def test_the_lease_of_a_killed_run_on_this_machine_is_taken_over_at_once(output):
    hold = ("import sys, time; from denseclip.lease import Lease; "
            "Lease(sys.argv[1], ttl_s=600).acquire(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, output], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld):  # alive: held for its whole TTL
            Lease(output, ttl_s=30).acquire()
    finally:
        holder.kill()
        holder.wait()
    successor = Lease(output, ttl_s=30)
    successor.acquire()  # its holder's process is gone: no need to wait the 600 s out
    assert successor.taken_over["pid"] == holder.pid and _record(output)["holder"] == successor.holder
    successor.release()
