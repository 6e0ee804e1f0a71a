from __future__ import annotations

from pathlib import Path

from edge_agent.outbox import Outbox


def test_messages_survive_reopen_and_leave_only_on_ack(tmp_path: Path, sealer, opener) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "outbox.sqlite"
    with Outbox(path, "ward-a", "us-01") as box:
        box.sealer = sealer("us-01")
        seqs = [box.put("result", {"i": i}).seq for i in range(5)]
        assert seqs == [1, 2, 3, 4, 5]
        box.mark_sent(seqs[:3])
    with Outbox(path, "ward-a", "us-01") as box:  # as after a power loss
        box.sealer = sealer("us-01")
        assert box.depth() == 5
        assert box.ack([1, 2, 99]) == 2
        assert box.depth() == 3
        nxt = box.put("result", {"i": 5})
        assert nxt.seq == 6, "sequence numbers never repeat across restarts"
        pending = box.due(resend_after=3600)
        assert [p.seq for p in pending] == [4, 5, 6], "sent-but-unacked wait for resend_after"
        assert opener.open(pending[0].payload).body == {"i": 3}


def test_events_jump_ahead_and_unacked_are_resent(tmp_path: Path, sealer) -> None:  # type: ignore[no-untyped-def]
    with Outbox(tmp_path / "o.sqlite", "ward-a", "us-01") as box:
        box.sealer = sealer("us-01")
        box.put("result", {})
        box.put("result", {})
        ev = box.put("event", {"event": "fall"})
        assert [p.seq for p in box.due(5.0)] == [ev.seq, 1, 2]
        box.mark_sent([1, 2, 3], now=1000.0)
        assert box.due(5.0, now=1004.0) == []
        assert [p.seq for p in box.due(5.0, now=1005.0)] == [3, 1, 2]
        assert box.reserve_seq() == 4
        box.unsend_all()
        assert len(box.due(3600)) == 3


def test_outbox_at_rest_holds_no_readable_results(tmp_path: Path, sealer) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "o.sqlite"
    with Outbox(path, "ward-a", "us-01") as box:
        box.sealer = sealer("us-01")
        box.put("result", {"pred_label": "malignant", "input": "patient-scan-123"})
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"malignant" not in raw and b"patient-scan-123" not in raw


def test_epochs_persist_so_a_restart_starts_a_fresh_key(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    with Outbox(path, "ward-a", "us-01") as box:
        assert [box.next_epoch(), box.next_epoch()] == [1, 2]
    with Outbox(path, "ward-a", "us-01") as box:
        assert box.next_epoch() == 3


def _on_disk(path: Path) -> list[int]:
    """What another process would see: the committed rows only."""
    import sqlite3

    with sqlite3.connect(path) as db:
        return [s for (s,) in db.execute("SELECT seq FROM outbox ORDER BY seq")]


def _poll(pred, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


def test_group_commit_writes_batches_and_an_event_commits_at_once(tmp_path: Path, sealer) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "o.sqlite"
    with Outbox(path, "ward-a", "us-01", batch_max=10, batch_ms=60_000) as box:
        box.sealer = sealer("us-01")
        for i in range(25):
            box.put("result", {"i": i})
        assert _poll(lambda: len(_on_disk(path)) == 20), "two full batches of 10"
        assert _on_disk(path) == list(range(1, 21)), "the open batch of 5 is not on disk yet"
        assert [p.seq for p in box.due(3600, limit=1000)] == list(range(1, 21)), (
            "only committed rows can be published"
        )
        assert box.depth() == 25, "depth counts the open batch too"
        assert box.commits == 2
        ev = box.put("event", {"event": "fall"})
        assert ev.seq == 26
        assert _on_disk(path) == list(range(1, 27)), "the event commits at once, with the batch"
        assert box.due(3600)[0].seq == 26, "and jumps ahead of routine results"
        assert box.commits == 3
        box.put("result", {"i": 25})
    assert _on_disk(path) == list(range(1, 28)), "close commits what is left"


def test_a_batch_closes_after_batch_ms(tmp_path: Path, sealer) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "o.sqlite"
    with Outbox(path, "ward-a", "us-01", batch_max=1000, batch_ms=30) as box:
        box.sealer = sealer("us-01")
        committed: list[int] = []
        box.on_commit = lambda: committed.append(len(_on_disk(path)))
        for i in range(3):
            box.put("result", {"i": i})
        assert _poll(lambda: _on_disk(path) == [1, 2, 3]), "committed by age, not by count"
        assert committed and committed[-1] == 3, "on_commit runs after the rows are on disk"


def test_batch_ms_0_commits_when_the_writer_is_free(tmp_path: Path, sealer) -> None:  # type: ignore[no-untyped-def]
    """No wait when idle: one result is on disk without a flush; a burst still forms batches
    (what arrives while a commit and its fsync run goes into the next one)."""
    path = tmp_path / "o.sqlite"
    with Outbox(path, "ward-a", "us-01", batch_max=1000, batch_ms=0) as box:
        box.sealer = sealer("us-01")
        box.put("result", {"i": 0})
        assert _poll(lambda: _on_disk(path) == [1]), "committed at once, with nothing to wait for"
        for i in range(1, 500):
            box.put("result", {"i": i})
        assert _poll(lambda: len(_on_disk(path)) == 500)
        assert box.commits < 250, f"{box.commits} commits for 500 results: no batches formed"


def test_sigkill_loses_nothing_that_could_have_been_published(tmp_path: Path, identity) -> None:  # type: ignore[no-untyped-def]
    """A real SIGKILL of a process in the middle of group commits: every row the link could
    have published (what due() returned) is still there, and the sequence goes on after it."""
    import json
    import signal
    import subprocess
    import sys

    path = tmp_path / "o.sqlite"
    child = f"""
import json, sys, time
from edge_agent.envelope import Sealer
from edge_agent.identity import DeviceIdentity
from edge_agent.outbox import Outbox
ident = DeviceIdentity.load({str(identity("us-01"))!r}, "ward-a", "us-01")
box = Outbox({str(path)!r}, "ward-a", "us-01", batch_max=8, batch_ms=60_000)
box.sealer = Sealer("ward-a", "us-01", ident.key, ident.recipient, box.next_epoch)
for i in range(29):
    box.put("result", {{"i": i}})
time.sleep(0.5)
print(json.dumps([p.seq for p in box.due(3600, limit=1000)]), flush=True)
time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    published = json.loads(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert published == list(range(1, 25)), "three full batches could go out"
    assert _on_disk(path) == published, "all of them survive the kill"
    with Outbox(path, "ward-a", "us-01") as box:
        assert box.next_seq() > max(published), "no published number is ever reused"


def test_quota_drops_oldest_results_never_events_and_then_refuses(  # type: ignore[no-untyped-def]
    tmp_path: Path, sealer, caplog
) -> None:
    import logging

    caplog.set_level(logging.WARNING, logger="medge.agent.outbox")
    path = tmp_path / "o.sqlite"
    with Outbox(path, "ward-a", "us-01", max_messages=5) as box:
        box.sealer = sealer("us-01")
        for i in range(3):
            box.put("result", {"i": i})  # 1 2 3
        box.put("event", {"event": "fall"})  # 4
        for i in range(3, 7):
            box.put("result", {"i": i})  # 5 6 7 8
        assert box.depth() == 5
        assert _on_disk(path) == [4, 5, 6, 7, 8], "the oldest routine results went first"
        assert box.drops == {"quota": 3}
        for _ in range(5):
            box.put("event", {"event": "fall"})  # 9..13: events push every result out
        assert _on_disk(path) == [4, 9, 10, 11, 12, 13], "events are never dropped"
        assert box.drops == {"quota": 7}
        box.put("result", {"i": 7})  # only events remain: refused
        assert _on_disk(path) == [4, 9, 10, 11, 12, 13]
        assert box.drops == {"quota": 7, "refused": 1}
        box.ack([4, 9, 10, 11, 12, 13])
        box.put("result", {"i": 8})
        assert _on_disk(path) == [15]
        assert box.drops == {"quota": 7, "refused": 1}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings  # one line per episode and kind, not one per drop
    assert "over its quota (5 messages)" in warnings[0]
    assert "only events" in warnings[1]


def test_quota_drops_what_never_left_before_what_may_be_at_the_gateway(  # type: ignore[no-untyped-def]
    tmp_path: Path, sealer
) -> None:
    """A result sent but not yet acknowledged may already be stored: the quota drops the
    oldest never-sent results first, and counts a sent one apart (``quota_sent``), so that
    results made = stored + quota + refused + the quota_sent ones the gateway did not get."""
    path = tmp_path / "o.sqlite"
    with Outbox(path, "ward-a", "us-01", max_messages=4) as box:
        box.sealer = sealer("us-01")
        for i in range(4):
            box.put("result", {"i": i})  # 1 2 3 4
        box.mark_sent([1, 2])  # on their way: the link cut before the acks came
        box.unsend_all()  # the reconnect makes them due again: still sent once
        box.put("result", {"i": 4})  # 5
        box.put("result", {"i": 5})  # 6
        assert _on_disk(path) == [1, 2, 5, 6], "never-sent 3 and 4 went, not the sent ones"
        assert box.drops == {"quota": 2}
        box.mark_sent([5, 6])
        box.put("result", {"i": 6})  # 7: every older one was sent: the oldest of them goes
        assert _on_disk(path) == [2, 5, 6, 7] and box.drops == {"quota": 2, "quota_sent": 1}


def test_quota_in_bytes_and_counts_survive_reopen(tmp_path: Path, sealer) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "o.sqlite"
    with Outbox(path, "ward-a", "us-01") as box:
        box.sealer = sealer("us-01")
        box.put("result", {"i": 0})
        one = box.size_bytes()
        for i in range(1, 4):
            box.put("result", {"i": i})
        assert 4 * one - 8 <= box.size_bytes() <= 4 * one + 8
    with Outbox(path, "ward-a", "us-01", max_bytes=int(2.5 * one)) as box:
        box.sealer = sealer("us-01")
        assert box.depth() == 4, "counts come back from disk"
        box.put("result", {"i": 4})
        assert _on_disk(path) == [4, 5], "down to what fits in 2.5 messages"
        assert box.drops == {"quota": 3}
        assert box.size_bytes() <= 2.5 * one


def test_key_rotation_inside_a_commit_does_not_deadlock(tmp_path: Path, identity) -> None:  # type: ignore[no-untyped-def]
    """The sealer asks the outbox for the next epoch when it rotates; sealing happens outside
    the outbox's database lock, so a rotation in the middle of a commit goes through."""
    import threading

    from edge_agent.envelope import Sealer
    from edge_agent.identity import DeviceIdentity

    ident = DeviceIdentity.load(identity("us-01"), "ward-a", "us-01")
    with Outbox(tmp_path / "o.sqlite", "ward-a", "us-01", batch_max=4, batch_ms=10) as box:
        box.sealer = Sealer("ward-a", "us-01", ident.key, ident.recipient, box.next_epoch, 2)
        t = threading.Thread(target=lambda: [box.put("result", {}) for _ in range(10)])
        t.start()
        t.join(timeout=20)
        assert not t.is_alive(), "deadlocked"
        box.put("event", {"event": "x"})
        assert box.sealer.epoch >= 5 and box.depth() == 11
