"""One pass of the rollout driver over one rollout (docs/rollouts.md, "What the driver
does"): read what its devices answered, act on its status (advance a running one, undo an
aborting one), then publish the commands owed to online devices. Every change is written to
the store as it is made, with an audit row and a log line, so a pass cut short by a crash
is simply done again by the next."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from edge_agent.errors import one_line
from edge_agent.topics import topic
from gateway.rollout_plan import Plan, stage_sizes
from gateway.rollout_store import (
    fleet_of,
    measure_after,
    measure_shadow,
    rollout_devices,
    shadow_of,
)

if TYPE_CHECKING:
    from gateway.rollout import RolloutDriver

__all__ = ["ABORT_COMMANDS", "RolloutPass"]

ABORT_COMMANDS = ("shadow-stop", "rollback-bundle")  # what an aborting rollout still sends
ALREADY = "already running it"  # the reason of a device found running the target at its turn

Row = dict[str, Any]


class RolloutPass:
    """One rollout (``row``, as gateway.rollout_store.rollouts reads it), one pass."""

    def __init__(self, driver: RolloutDriver, row: Row) -> None:
        self.d, self.r = driver, row
        self.store = driver.store
        self.rid = int(row["id"])
        self.target = str(row["bundle"])
        self.plan = Plan.of_json(row["plan"])
        self.now = driver.clock()
        self.devs = rollout_devices(self.store, self.rid)
        self.fleet = fleet_of(self.store, self.devs)
        self.failures: list[str] = []

    def run(self) -> None:
        for dev in self.devs:
            self._observe(dev)
        if self.r["status"] == "aborting":
            self._abort()
        elif self.r["status"] == "running":
            if self.failures:
                self._pause(self.failures[0])
            else:
                self._advance()
        if self.r["status"] in ("running", "aborting"):
            for dev in self.devs:
                self._deliver(dev)
        if self.r["status"] != "paused":
            self.d.clear_paused(self.rid, self._site())

    # -- rows ------------------------------------------------------------------------------
    def _here(self, dev: Row) -> Row:
        """The device's row in the devices table: state, state_since, bundle, telemetry."""
        return self.fleet.get((dev["site"], dev["device"]), {})

    def _set(self, dev: Row, **cols: Any) -> None:
        if "state" in cols and cols["state"] != dev["state"]:
            cols.setdefault("since", self.now)
            why = f" ({cols['reason']})" if cols.get("reason") else ""
            text = f"{dev['state']} -> {cols['state']}{why}"
            self.d.audit(self.rid, text, dev["site"], dev["device"])
        dev.update(cols)
        sets = ", ".join(f"{k}=?" for k in cols)
        with self.store.transaction() as db:
            db.execute(
                f"UPDATE rollout_devices SET {sets} WHERE rollout=? AND site=? AND device=?",
                (*cols.values(), self.rid, dev["site"], dev["device"]),
            )

    def _rollout(self, where_status: str, **cols: Any) -> bool:
        """Update the rollout's row if its status is still ``where_status`` (the CLI may have
        paused or aborted it since this pass read it)."""
        cols["updated"] = self.now
        sets = ", ".join(f"{k}=?" for k in cols)
        with self.store.transaction() as db:
            cur = db.execute(
                f"UPDATE rollouts SET {sets} WHERE id=? AND status=?",
                (*cols.values(), self.rid, where_status),
            )
            done = cur.rowcount == 1
        if done:
            self.r.update(cols)
        return done

    def _pause(self, reason: str) -> None:
        if self._rollout("running", status="paused", reason=reason):
            self.d.audit(self.rid, f"paused: {reason}")
            self.d.alert_paused(self.rid, self._site(), reason)

    def _site(self) -> str:
        """The site the rollout's alert is shown under: its first device's."""
        return str(self.devs[0]["site"]) if self.devs else "-"

    def _events(self, dev: Row, after: int | None) -> list[Row]:
        """The device's ``update`` events stored after results id ``after``."""
        if after is None:
            return []
        rows = self.store.query(
            "SELECT body FROM results WHERE site=? AND device=? AND kind='event' AND id>? "
            "ORDER BY id",
            (dev["site"], dev["device"], after),
        )
        out = []
        for r in rows:
            try:
                body = json.loads(r["body"])
            except (ValueError, RecursionError):
                continue
            if isinstance(body, dict) and isinstance(body.get("update"), str):
                out.append(body)
        return out

    def _fail(self, dev: Row, reason: str) -> None:
        reason = one_line(reason, 300)
        self._set(dev, state="failed", reason=reason, cmd=None)
        self.failures.append(f"{dev['site']}/{dev['device']}: {reason}")

    # -- what the devices answered ---------------------------------------------------------
    def _observe(self, dev: Row) -> None:
        state = dev["state"]
        answers = self._events(dev, dev["cmd_mark"]) if dev["cmd"] and dev["cmd_sent"] else []
        if state == "shadowing" and dev["cmd"] == "shadow-bundle":
            self._shadow_answer(dev, answers)
        elif state == "updating":
            self._update_answer(dev, answers)
        elif state == "done" and (bad := self._probation(dev)):
            self._fail(dev, bad)
        elif state in ("done", "stopped") and dev["cmd"] == "shadow-stop":
            if any(e["update"] in ("shadow_stopped", "rejected") for e in answers):
                self._set(dev, cmd=None)
        elif state == "rolling_back":
            self._rollback_answer(dev, answers)

    def _shadow_answer(self, dev: Row, answers: list[Row]) -> None:
        rejected = [e for e in answers if e["update"] == "rejected"]
        if shadow_of(self._here(dev).get("telemetry"), self.target) is not None or any(
            e["update"] == "shadow" and e.get("bundle") == self.target for e in answers
        ):
            self._set(dev, cmd=None)
        elif rejected:
            self._fail(dev, f"shadow refused: {rejected[0].get('reason')}")

    def _update_answer(self, dev: Row, answers: list[Row]) -> None:
        rejected = [e for e in answers if e["update"] == "rejected"]
        if self._here(dev).get("bundle") == self.target:
            applied = [
                e.get("previous")
                for e in self._events(dev, dev["update_mark"])
                if e["update"] == "applied" and e.get("bundle") == self.target
            ]
            self._done(dev, next((p for p in applied if p), None) or dev["previous"])
        elif bad := self._probation(dev):
            self._fail(dev, bad)
        elif rejected:
            e = rejected[0]
            reason = str(e.get("reason") or "")
            if e.get("running") == self.target or "already running" in reason:
                self._done(dev, dev["previous"])  # sent again after it took it: harmless
            else:
                self._fail(dev, f"update rejected: {reason}")

    def _rollback_answer(self, dev: Row, answers: list[Row]) -> None:
        running = self._here(dev).get("bundle")
        back = any(  # the device's event: bundle = the one it left, running = restored
            e["update"] == "rolled_back" and e.get("bundle") == self.target for e in answers
        )
        if back or (running is not None and running == dev["previous"]):
            self._set(dev, state="rolled_back", cmd=None)
        elif rejected := [e for e in answers if e["update"] == "rejected"]:
            self._fail(dev, f"rollback refused: {rejected[0].get('reason')}")

    def _probation(self, dev: Row) -> str | None:
        """The device rolled the target back by itself (its probation), as its event says."""
        for e in self._events(dev, dev["update_mark"]):
            if (
                e["update"] == "rolled_back"
                and e.get("bundle") == self.target
                and e.get("reason") != "commanded"
            ):
                return f"rolled back by the device: {e.get('reason')}"
        return None

    def _done(self, dev: Row, previous: str | None) -> None:
        self._set(dev, state="done", previous=previous, switched=self.now, cmd=None)
        if self.plan.shadow:  # a shadow of the target beside itself is of no use now
            self._set(dev, cmd="shadow-stop", cmd_sent=None, cmd_conn=None)

    # -- moving on -------------------------------------------------------------------------
    def _advance(self) -> None:
        sizes = stage_sizes(len(self.devs), self.plan.canary, self.plan.steps)
        stage = int(self.r["stage"])
        if stage >= len(sizes):  # every stage done: complete once no command is owed
            if not any(d["cmd"] for d in self.devs):
                self._complete()
            return
        live = [d for d in self.devs if d["stage"] == stage and d["state"] != "failed"]
        for dev in live:
            if dev["state"] == "pending" and self._here(dev).get("bundle") == self.target:
                self._set(dev, state="done", reason=ALREADY, switched=self.now)
        if self.r["phase"] == "shadow":
            self._advance_shadow(sizes[stage][0], stage, live)
        else:
            self._advance_switch(sizes, stage, live)

    def _advance_shadow(self, name: str, stage: int, live: list[Row]) -> None:
        for dev in live:
            if dev["state"] == "pending":
                self._set(dev, state="shadowing", cmd="shadow-bundle", cmd_sent=None)
        shadowing = [d for d in live if d["state"] == "shadowing"]
        m = measure_shadow(self.target, shadowing, self.fleet)
        if shadowing and m["samples_min"] < self.plan.min_results:
            return
        failing = self._check(stage, "shadow", m)
        if failing:
            self._pause(f"stage {name}: {failing} (shadow run on {len(shadowing)} device(s))")
        elif self._rollout("running", phase="switch"):
            self.d.audit(self.rid, f"stage {name}: the shadow gates hold; switching")

    def _advance_switch(self, sizes: list[tuple[str, int]], stage: int, live: list[Row]) -> None:
        name = sizes[stage][0]
        for dev in live:
            if dev["state"] in ("pending", "shadowing"):
                running = self._here(dev).get("bundle")
                self._set(
                    dev, state="updating", cmd="update-bundle", cmd_sent=None, previous=running
                )
        if any(d["state"] != "done" for d in live):
            return
        m = measure_after(self.store, self.target, live, self.now)
        if live and m["results_min"] < self.plan.min_results:
            return
        failing = self._check(stage, "after", m)
        if failing:
            self._pause(f"stage {name}: {failing} (after the switch of {len(live)} device(s))")
            return
        nxt = stage + 1
        phase = "shadow" if self.plan.shadow else "switch"
        if self._rollout("running", stage=nxt, phase=phase, stage_since=self.now):
            self.d.audit(self.rid, f"stage {name} done ({len(live)} device(s))")

    def _check(self, stage: int, phase: str, measured: Row) -> str:
        """Record the measures that decide this stage's ``phase``; '' when its gates hold,
        else what failed (``gate agreement>=0.98 failed: measured 0.9``)."""
        values = dict(self.r["gate_values"])
        values.setdefault(str(stage), {})[phase] = {**measured, "at": self.now}
        if self._rollout("running", gate_values=json.dumps(values)):
            self.r["gate_values"] = values
        return "; ".join(
            f"gate {g} failed: measured {measured.get(g.measure)}"
            for g in self.plan.gates_of(phase)
            if not g.holds(measured.get(g.measure))
        )

    def _complete(self) -> None:
        if self._rollout("running", status="completed", reason=None):
            self.d.audit(self.rid, f"completed: {self.target} on every stage")

    def _abort(self) -> None:
        for dev in self.devs:
            state, here = dev["state"], self._here(dev)
            if state == "shadowing":
                self._set(dev, state="stopped", cmd="shadow-stop", cmd_sent=None)
            elif state == "done" and dev["reason"] != ALREADY:
                if dev["previous"]:
                    self._set(dev, state="rolling_back", cmd="rollback-bundle", cmd_sent=None)
                else:
                    self._fail(dev, "cannot roll back: the bundle it ran before is unknown")
            elif state == "updating" and here.get("bundle") == self.target:
                self._set(dev, state="rolling_back", cmd="rollback-bundle", cmd_sent=None)
            elif state == "updating" and (
                dev["cmd_sent"] is None
                or (here.get("state") == "online" and here.get("state_since") != dev["cmd_conn"])
            ):  # never sent, or it came back since without taking it
                self._set(dev, state="pending", reason="update not taken (aborted)", cmd=None)
        waiting = [
            d
            for d in self.devs
            if d["state"] in ("rolling_back", "updating") or d["cmd"] in ABORT_COMMANDS
        ]
        if not waiting and self._rollout("aborting", status="aborted"):
            self.d.audit(self.rid, "aborted: every device that took it runs its previous bundle")

    # -- commands --------------------------------------------------------------------------
    def _deliver(self, dev: Row) -> None:
        """Publish the command owed to ``dev`` if it is online and has not had it on this
        connection; recorded as sent only once the broker has it."""
        cmd, here = dev["cmd"], self._here(dev)
        if not cmd or (self.r["status"] == "aborting" and cmd not in ABORT_COMMANDS):
            return
        if here.get("state") != "online":
            return  # sent when it comes online
        if dev["cmd_sent"] is not None and here.get("state_since") == dev["cmd_conn"]:
            return  # sent on this connection: its answer is awaited
        site, device = dev["site"], dev["device"]
        issued = max(time.time_ns() // 1_000_000, self._last_issued(site, device) + 1)
        payload = self.d.command(site, device, cmd, issued, **self._fields(dev, cmd))
        mark = self.store.query(
            "SELECT coalesce(max(id), 0) AS m FROM results WHERE site=? AND device=?",
            (site, device),
        )[0]["m"]
        if not self.d.send(topic(site, device, "cmd"), payload, cmd):
            return
        cols: Row = {"cmd_sent": self.now, "cmd_conn": here.get("state_since")}
        cols.update(cmd_mark=int(mark), sends=int(dev["sends"]) + 1, issued_ms=issued)
        if cmd == "update-bundle":
            cols["update_mark"] = int(mark)
        again = " again" if dev["cmd_sent"] is not None else ""
        self._set(dev, **cols)
        to = f" (to {dev['previous']})" if cmd == "rollback-bundle" else ""
        self.d.audit(self.rid, f"{cmd}{to} sent{again}", site, device)

    def _fields(self, dev: Row, cmd: str) -> Row:
        """The command's own fields (docs/rollouts.md, "Commands")."""
        if cmd == "rollback-bundle":
            return {"to": dev["previous"]}
        if cmd not in ("shadow-bundle", "update-bundle"):
            return {}
        fields: Row = {"url": self.d.url_for(self.r["archive"]), "sha256": self.r["sha256"]}
        if cmd == "shadow-bundle":
            fields.update(share=self.plan.shadow_share, cpu_budget=self.plan.cpu_budget)
        elif self.plan.allow_downgrade:
            fields["allow_downgrade"] = True
        return fields

    def _last_issued(self, site: str, device: str) -> int:
        """The newest issued_ms any rollout gave this device: each command's must be newer."""
        rows = self.store.query(
            "SELECT coalesce(max(issued_ms), 0) AS m FROM rollout_devices "
            "WHERE site=? AND device=?",
            (site, device),
        )
        return int(rows[0]["m"])
