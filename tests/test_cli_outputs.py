"""`medge gateway outputs` (medge/cli_outputs.py) over a real clinical outbox file: what waits
and what is parked per target, the parked items with their reasons, unparking (also while a
sender runs against a real FHIR receiver), the outbox found through gateway.yaml, and the
one-line errors for a missing file or a config without outputs."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from fhir_receiver import FhirReceiver, receiver_fixture  # noqa: F401 (the fhir_receiver fixture)
from waiting import wait_for

from gateway.clinical.outbox import ClinicalItem, ClinicalOutbox
from gateway.clinical.sender import ClinicalSender
from gateway.clinical.settings import FhirModel, FhirSettings, OutputsSettings
from medge.cli import build_parser, main

SITE = "ward-a"
ECG = "ecg_gru@1.2#0123456789ab"
T0 = 1_764_900_000.0
REFUSED = "the PACS refused it: failure reason 0xA700"
BAD_FHIR = "result ward-a/holter-1/7: pred is not a class of ecg_gru"
DOWN = "cannot connect to 127.0.0.1:4242 (Connection refused)"


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["gateway", "outputs", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _item(target: str, device: str, seq: int, kind: str = "result") -> ClinicalItem:
    return ClinicalItem(target, SITE, device, seq, kind, T0 + seq, ECG, {"pred": 0})


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    """pacs: 3 waiting (the first failed once), 2 parked; fhir: 1 waiting, 1 parked."""
    path = tmp_path / "gw.clinical.sqlite"
    pacs = [_item("pacs", "us-01", seq) for seq in range(1, 6)]
    fhir = [_item("fhir", "holter-1", 7), _item("fhir", "holter-1", 8, "event")]
    with ClinicalOutbox(path) as box:
        box.put_many(pacs + fhir)
        box.park(pacs[3:], REFUSED)
        box.park(fhir[:1], BAD_FHIR)
        box.retry_later(pacs[:1], DOWN, time.time() + 100)
    return path


def _counts(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    with ClinicalOutbox(path) as box:
        return box.depth(), box.parked_count()


def test_status_says_per_target_what_waits_what_is_parked_and_the_last_error(
    outbox: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(capsys, "--outbox", str(outbox))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"clinical outbox {outbox}"
    fhir, pacs = lines[1], lines[2]
    assert fhir.startswith("  fhir: 1 waiting, 1 parked; oldest waiting ")
    assert fhir.endswith("; next event ward-a/holter-1/8")  # never tried: no error
    assert pacs.startswith("  pacs: 3 waiting, 2 parked; oldest waiting ")
    assert re.search(
        r"; next result ward-a/us-01/1, 1 attempt\(s\), next try in 1 min [34]\d s,", pacs
    )
    assert pacs.endswith(f", last error: {DOWN}")
    assert "--parked" in lines[3] and "--unpark" in lines[3]

    code, out, _ = _cli(capsys, "--outbox", str(outbox), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["outbox"] == str(outbox)
    pacs_doc = doc["targets"]["pacs"]
    assert (pacs_doc["waiting"], pacs_doc["parked"], pacs_doc["configured"]) == (3, 2, None)
    assert 0 <= pacs_doc["oldest_waiting_s"] < 60
    nxt = pacs_doc["next"]
    assert (nxt["site"], nxt["device"], nxt["seq"], nxt["kind"]) == (SITE, "us-01", 1, "result")
    assert nxt["attempts"] == 1 and 80 < nxt["next_try_in_s"] <= 100
    assert nxt["last_error"] == DOWN
    assert doc["targets"]["fhir"]["next"]["last_error"] is None
    assert _counts(outbox) == ({"pacs": 3, "fhir": 1}, {"pacs": 2, "fhir": 1}), "it reads only"


def test_parked_lists_each_item_with_its_reason(
    outbox: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(capsys, "--outbox", str(outbox), "--parked")
    assert code == 0
    assert out.splitlines() == [
        f"clinical outbox {outbox}: 3 parked",
        f"  fhir ward-a/holter-1/7 result, 1 attempt(s): {BAD_FHIR}",
        f"  pacs ward-a/us-01/4 result, 1 attempt(s): {REFUSED}",
        f"  pacs ward-a/us-01/5 result, 1 attempt(s): {REFUSED}",
    ]
    code, out, _ = _cli(capsys, "--outbox", str(outbox), "--parked", "2", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["parked_total"] == 3
    assert [(p["target"], p["seq"], p["reason"]) for p in doc["parked"]] == [
        ("fhir", 7, BAD_FHIR),
        ("pacs", 4, REFUSED),
    ]
    _, out, _ = _cli(capsys, "--outbox", str(outbox), "--parked", "1")
    assert out.splitlines()[-1] == "  ... and 2 more (--parked N shows N)"


def test_unpark_moves_parked_items_back_to_waiting(
    outbox: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(capsys, "--outbox", str(outbox), "--unpark", "pacs")
    assert code == 0
    assert out.startswith(f"clinical outbox {outbox}: unparked 2 item(s) (pacs 2); a running")
    assert _counts(outbox) == ({"pacs": 5, "fhir": 1}, {"fhir": 1})
    code, out, _ = _cli(capsys, "--outbox", str(outbox), "--unpark", "--json")
    assert code == 0
    assert json.loads(out)["unparked"] == {"fhir": 1, "pacs": 0}
    assert _counts(outbox) == ({"pacs": 5, "fhir": 2}, {})
    with ClinicalOutbox(outbox) as box:
        (head,) = box.due("pacs")  # back in the line, in send order, due at once
        assert head.seq == 1 and box.due("pacs", 5)[3].seq == 4
    _, out, _ = _cli(capsys, "--outbox", str(outbox), "--unpark")
    assert "unparked 0 item(s) (fhir 0, pacs 0)" in out


def test_unpark_reaches_a_running_sender_within_a_second_or_so(
    fhir_receiver: FhirReceiver, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The gateway's sender holds the outbox open; the command, another connection, unparks;
    the sender (which polls every second) sends them on its own."""
    path = tmp_path / "gw.clinical.sqlite"
    model = FhirModel(signal="ecg", labels=["N", "V"], positive_label="V")
    fhir = FhirSettings(base_url=fhir_receiver.url, timeout_s=5.0, models={"ecg_gru": model})
    body = {"input": "h#0", "sample_time": T0, "pred": 0, "pred_label": "N", "bundle": ECG}
    body |= {"scores": [0.9, 0.1], "positive_label": "V", "latency_ms": 1.0}
    fhir_receiver.fail_next(1, status=422)  # refused content: parked, not retried
    with ClinicalOutbox(path) as box, ClinicalSender(box, OutputsSettings(fhir=fhir)) as sender:
        sender.put([(SITE, "holter-1", 1, "result", T0, ECG, body)])
        wait_for(lambda: box.parked_count() == {"fhir": 1}, 10, box.summary)
        code, out, _ = _cli(capsys, "--outbox", str(path), "--parked")
        assert (
            code == 0
            and "fhir ward-a/holter-1/1 result, 1 attempt(s): FHIR server: HTTP 422" in out
        )
        start = time.monotonic()
        assert _cli(capsys, "--outbox", str(path), "--unpark", "fhir")[0] == 0
        wait_for(lambda: fhir_receiver.count("Observation") == 1, 5, box.summary)
        assert time.monotonic() - start < 3
        wait_for(lambda: box.depth() == {} and box.parked_count() == {}, 5, box.summary)
        assert sender.stats["fhir"].sent == 1


def _config(tmp_path: Path, outputs: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(f"gateway:\n  site_dir: site\n  store:\n    db: gw.sqlite\n{outputs}")
    return path


FHIR_OUTPUTS = """\
  outputs:
    fhir:
      base_url: http://127.0.0.1:1/fhir
      models:
        ecg_gru: {signal: ecg, labels: [N, V], positive_label: V}
"""


def test_the_outbox_comes_from_gateway_yaml(
    outbox: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # default: <store.db>.clinical.sqlite beside the store, relative to the file
    config = _config(tmp_path, FHIR_OUTPUTS)
    code, out, _ = _cli(capsys, "--config", str(config), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["outbox"] == str(outbox)
    assert doc["targets"]["fhir"]["configured"] is True
    assert doc["targets"]["pacs"]["configured"] is False  # items nobody sends: said so
    _, out, _ = _cli(capsys, "--config", str(config))
    assert out.splitlines()[2].endswith(" [not in outputs: nothing sends these]")
    # outputs.outbox, relative to the file; a configured target with nothing in it is listed
    (tmp_path / "var").mkdir()
    outbox.rename(tmp_path / "var" / "clin.sqlite")
    config = _config(tmp_path, FHIR_OUTPUTS + "    outbox: var/clin.sqlite\n")
    with ClinicalOutbox(tmp_path / "var" / "clin.sqlite") as box:
        box.delete(box.due("fhir", 10) + [p.item for p in box.parked("fhir")])
    code, out, _ = _cli(capsys, "--config", str(config))
    assert code == 0
    assert out.splitlines()[:2] == [
        f"clinical outbox {tmp_path / 'var' / 'clin.sqlite'}",
        "  fhir: 0 waiting, 0 parked",
    ]


def test_errors_are_one_line_and_create_nothing(
    outbox: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "none.sqlite"
    code, out, err = _cli(capsys, "--outbox", str(missing))
    assert (code, out) == (2, "")
    assert err == (
        f"medge: error: clinical outbox {missing} does not exist (a gateway with outputs: "
        "creates it when it starts)\n"
    )
    assert not missing.exists()
    config = _config(tmp_path, "")
    code, _, err = _cli(capsys, "--config", str(config))
    assert code == 2
    assert err.startswith(f"medge: error: {config}: no 'outputs:' in its gateway: section")
    assert err.count("\n") == 1
    code, _, err = _cli(capsys)
    assert code == 2 and "give --config gateway.yaml (its outputs: section) or --outbox" in err
    # a SQLite file that is not an outbox (the store, say) is refused, not given a table
    store = tmp_path / "gw.sqlite"
    with ClinicalOutbox(outbox) as box:
        box.unpark()
    store.write_bytes(b"")
    code, _, err = _cli(capsys, "--outbox", str(store))
    assert code == 2 and "is not a clinical outbox (it has no 'clinical' table)" in err
    assert store.read_bytes() == b""
    code, _, err = _cli(capsys, "--outbox", str(outbox), "--parked", "0")
    assert code == 2 and "--parked N: N must be 1 or more" in err
    with pytest.raises(SystemExit) as exc:
        main(["gateway", "outputs", "--outbox", str(outbox), "--unpark", "dicom"])
    assert exc.value.code == 2  # argparse's usage error
    with pytest.raises(SystemExit) as exc:
        main(["gateway", "outputs", "--outbox", str(outbox), "--parked", "--unpark"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_help_teaches_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["gateway", "outputs", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: medge gateway outputs")
    for words in ("--parked [N]", "--unpark [TARGET]", "--outbox FILE", "--json", "examples:"):
        assert words in text
    assert "clinical.sqlite beside the store" in text and "never creates one" in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["gateway", "--help"])
    assert "watch the clinical outbox" in capsys.readouterr().out
