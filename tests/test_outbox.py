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
