"""Over-the-air bundle updates, without stopping the stream. See docs/device.md.

The gateway publishes on the device's ``cmd`` topic a signed command (:mod:`edge_agent.commands`:
its format, signing and checks; its names are importable from here too): ``update-bundle``
here, and the rollout's ``shadow-bundle``, ``shadow-stop``, ``rollback-bundle``. ``issued_ms``
must be newer than the last command's, so none can be replayed. A newer command cannot roll
the device back either: a bundle whose ``version`` is older than the running one's is refused
unless the signed command says ``allow_downgrade``. The agent downloads the archive (a tar.gz
of the bundle's files), checks its SHA-256, unpacks it beside the current bundle, verifies it
exactly as at start (signature + every hash), self-tests it on recent inputs, and swaps it in
between two samples.
The previous bundle stays on disk; a bundle that fails any step is deleted and the old one
keeps running. Each outcome is an ``event`` through the outbox:
``{"update": "applied"|"rejected", "bundle": id, "previous": id, "reason": ...}``.

After the swap the new model is on probation, and a failing one is rolled back: that is the
work of :class:`ModelSlot` (``edge_agent.model_slot``; it and ProbationError are importable
from here too).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import shutil
import tarfile
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from edge_agent.bundle import Bundle
from edge_agent.commands import (
    COMMAND_VERSION,
    COMMANDED,
    UpdateCommand,
    UpdateError,
    sign_command,
    verify_command,
)
from edge_agent.errors import MedgeError, one_line
from edge_agent.model import LoadedModel
from edge_agent.model_slot import ModelSlot, ProbationError, check_scores
from edge_agent.shadow import ShadowRun

__all__ = [
    "COMMAND_VERSION",
    "ModelSlot",
    "ProbationError",
    "UpdateCommand",
    "UpdateError",
    "Updater",
    "sign_command",
    "verify_command",
]

log = logging.getLogger("medge.agent.update")
MAX_ARCHIVE_BYTES = 512 << 20


def version_key(version: str) -> tuple[int, ...]:
    """How bundle versions order: by their numbers, left to right (the converter writes the
    conversion time, ``20261205.004848``; ``1.10`` > ``1.9``)."""
    return tuple(int(n) for n in re.findall(r"\d{1,18}", version)[:16])


def is_downgrade(new: str, running: str) -> bool:
    """True if version ``new`` is older than ``running`` (versions without numbers: never)."""
    a, b = version_key(new), version_key(running)
    return bool(a and b) and a < b


class Updater:
    """Runs update commands one at a time in its own thread. Use as a context manager."""

    def __init__(
        self,
        slot: ModelSlot,
        trusted: list[ed25519.Ed25519PublicKey],
        site: str,
        device: str,
        state_dir: Path,
        report: Callable[[dict[str, Any]], None],
        load: Callable[[Bundle], LoadedModel],
        current_link: Path | None = None,
    ) -> None:
        """``state_dir``: where bundles/ and update.json live; ``current_link``: the
        configured bundle path, repointed after a swap when it is a symlink (the packaged
        layout), so a restart runs the new bundle too."""
        self.slot, self.trusted, self.site, self.device = slot, trusted, site, device
        self.bundles = state_dir / "bundles"
        self._state = state_dir / "update.json"
        self.report, self.load, self.current_link = report, load, current_link
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self._before_swap: Path | None = None  # where the link pointed before the last swap
        self.shadow: ShadowRun | None = None  # a candidate run beside the current model
        self._kind: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"update-{device}", daemon=True)

    def __enter__(self) -> Updater:
        self._resume_shadow()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    @property
    def thread(self) -> threading.Thread:
        """The thread that handles commands (for supervision)."""
        return self._thread

    def submit(self, payload: bytes) -> None:
        """From the MQTT thread: queue a command (a full queue drops it, and says so)."""
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            self.report({"update": "rejected", "bundle": None, "reason": "update queue full"})

    def _run(self) -> None:
        while (payload := self._queue.get()) is not None:
            self._kind = None  # the command being handled, once it parses
            try:
                self.handle(payload)
            except Exception as exc:  # one bad command (10,000 levels deep...) is rejected only
                why = str(exc) if isinstance(exc, UpdateError) else f"{type(exc).__name__}: {exc}"
                log.warning("%s: update rejected: %s", self.device, one_line(why))
                self.report(
                    {
                        "update": "rejected",
                        "cmd": self._kind,
                        "bundle": getattr(exc, "bundle", None),
                        "running": self.slot.bundle.id,
                        "reason": one_line(why),
                    }
                )

    def handle(self, payload: bytes) -> None:
        cmd = verify_command(payload, self.trusted, self.site, self.device)
        self._kind = cmd.cmd
        if cmd.issued_ms <= self._last_issued():
            raise UpdateError("command is not newer than the last applied one (replayed?)")
        if cmd.cmd == "shadow-stop":
            self._remember(cmd.issued_ms)
            if not self._stop_shadow("commanded"):
                raise UpdateError("no shadow run to stop")
            return
        if cmd.cmd == "rollback-bundle":
            self._rollback(cmd)
            return
        if cmd.cmd == "update-bundle":
            self._stop_shadow("update")  # an update ends any shadow run first
        final, bundle, model = self._install(cmd)
        if cmd.cmd == "shadow-bundle":
            self._remember(cmd.issued_ms)
            self._start_shadow(ShadowRun(model, cmd.share, cmd.cpu_budget))
            return
        running = self.slot.bundle
        previous = {"id": running.id, "dir": str(running.directory.resolve())}
        self._remember(cmd.issued_ms, bundle=bundle.id, previous=previous)
        self._persist(final)  # first, so a quick rollback cannot be undone by it
        self.slot.offer(model)  # the pipeline swaps it in before its next sample

    def _install(self, cmd: UpdateCommand) -> tuple[Path, Bundle, LoadedModel]:
        """Fetch, unpack, verify (exactly as at start), refuse a downgrade (updates only),
        place under bundles/ and self-test the command's bundle."""
        self.bundles.mkdir(parents=True, exist_ok=True)
        incoming = self.bundles / f".incoming-{cmd.sha256[:16]}"
        shutil.rmtree(incoming, ignore_errors=True)
        try:
            archive = self._fetch(cmd, incoming.with_suffix(".tar.gz"))
            _unpack(archive, incoming)
            archive.unlink()
            bundle = Bundle.load(incoming, trusted=self.trusted)  # exactly as at start
            running = self.slot.bundle
            if bundle.id == running.id:
                raise UpdateError(f"bundle {bundle.id} is already running")
            new_v, old_v = bundle.manifest.version, running.manifest.version
            downgrade = is_downgrade(new_v, old_v) and cmd.cmd == "update-bundle"
            if downgrade and not cmd.allow_downgrade:
                err = UpdateError(
                    one_line(
                        f"bundle {bundle.id} is older than the running {running.id} (version "
                        f"{new_v} < {old_v}): a downgrade needs a command with allow_downgrade"
                    )
                )
                err.bundle = bundle.id  # type: ignore[attr-defined]
                raise err
            final = self.bundles / f"{bundle.manifest.name}-{bundle.manifest_sha256[:12]}"
            shutil.rmtree(final, ignore_errors=True)
            incoming.rename(final)
            bundle = Bundle.load(final, trusted=self.trusted)
            model = self._self_test(bundle)
        except UpdateError:
            shutil.rmtree(incoming, ignore_errors=True)
            incoming.with_suffix(".tar.gz").unlink(missing_ok=True)
            raise
        except MedgeError as exc:  # BundleError, BackendError: the bundle's own fault
            shutil.rmtree(incoming, ignore_errors=True)
            raise UpdateError(str(exc)) from exc
        return final, bundle, model

    # -- shadow runs: a candidate beside the running model (edge_agent.shadow) ----------------
    def _start_shadow(self, run: ShadowRun, resumed: bool = False) -> None:
        if not resumed:
            self._stop_shadow("replaced")
        self.shadow = run
        # kept across a restart of the agent: the rollout waits for its samples
        where = str(run.model.bundle.directory.resolve())
        self._remember(
            None, shadow={"dir": where, "share": run.share, "cpu_budget": run.cpu_budget}
        )
        log.info(
            "%s: shadowing %s on %.0f%% of samples (CPU budget %.2gx)",
            self.device,
            run.bundle_id,
            run.share * 100,
            run.cpu_budget,
        )
        self.report(
            {
                "update": "shadow",
                "bundle": run.bundle_id,
                "running": self.slot.bundle.id,
                "share": run.share,
                "cpu_budget": run.cpu_budget,
                **({"resumed": True} if resumed else {}),
            }
        )

    def _resume_shadow(self) -> None:
        """At start: the shadow run the agent had before it stopped, if its bundle is still
        here and still passes (signature, hashes, self-test); else it is told and dropped."""
        kept = self._read_state().get("shadow")
        if not isinstance(kept, dict):
            return
        try:
            bundle = Bundle.load(Path(str(kept.get("dir"))), trusted=self.trusted)
            model = self._self_test(bundle, delete=False)
            run = ShadowRun(model, float(kept["share"]), float(kept["cpu_budget"]))
        except (MedgeError, KeyError, TypeError, ValueError) as exc:
            self._remember(None, shadow=None)
            why = one_line(f"shadow run not resumed: {exc}")
            log.warning("%s: %s", self.device, why)
            self.report({"update": "rejected", "cmd": "shadow-bundle", "bundle": None,
                         "running": self.slot.bundle.id, "reason": why})  # fmt: skip
            return
        self._start_shadow(run, resumed=True)

    def _stop_shadow(self, why: str) -> bool:
        """End the shadow run, if any (its bundle is deleted unless it runs); True if one ran."""
        run, self.shadow = self.shadow, None
        if run is None:
            return False
        self._remember(None, shadow=None)
        where = run.model.bundle.directory
        if self.bundles in where.resolve().parents and where.resolve() != self._running_dir():
            shutil.rmtree(where, ignore_errors=True)
        log.info(
            "%s: shadow run of %s ended (%s): %s", self.device, run.bundle_id, why, run.snapshot()
        )
        self.report({"update": "shadow_stopped", "bundle": run.bundle_id, "reason": why})
        return True

    def _running_dir(self) -> Path:
        return self.slot.bundle.directory.resolve()

    # -- a rollback the gateway commands (a rollout aborted) ----------------------------------
    def _rollback(self, cmd: UpdateCommand) -> None:
        previous = self._read_state().get("previous") or {}
        pid, pdir, running = previous.get("id"), previous.get("dir"), self.slot.bundle
        if cmd.to is not None and cmd.to == running.id:
            raise UpdateError(f"bundle {cmd.to} is already running")
        if not isinstance(pid, str) or not isinstance(pdir, str):
            raise UpdateError("no previous bundle to go back to")
        if cmd.to is not None and cmd.to != pid:
            raise UpdateError(one_line(f"the previous bundle is {pid}, not {cmd.to}"))
        try:
            bundle = Bundle.load(Path(pdir), trusted=self.trusted)
        except MedgeError as exc:
            raise UpdateError(one_line(f"previous bundle {pid}: {exc}")) from exc
        model = self._self_test(bundle, delete=False)  # never delete the bundle we go back to
        self._stop_shadow("rollback")
        self._remember(cmd.issued_ms, bundle=bundle.id, previous=None)
        self.slot.offer(model, rollback=COMMANDED)

    def _fetch(self, cmd: UpdateCommand, dest: Path) -> Path:
        h = hashlib.sha256()
        n = 0
        try:
            with urllib.request.urlopen(cmd.url, timeout=30) as resp, dest.open("wb") as f:  # noqa: S310 (scheme checked)
                while chunk := resp.read(1 << 16):
                    n += len(chunk)
                    if n > MAX_ARCHIVE_BYTES:
                        raise UpdateError(f"archive larger than {MAX_ARCHIVE_BYTES >> 20} MiB")
                    h.update(chunk)
                    f.write(chunk)
        except OSError as exc:
            raise UpdateError(f"cannot fetch {cmd.url}: {exc}") from exc
        if h.hexdigest() != cmd.sha256:
            raise UpdateError(f"archive sha256 {h.hexdigest()[:16]}... does not match the command")
        return dest

    def _self_test(self, bundle: Bundle, delete: bool = True) -> LoadedModel:
        """Open it on this device's backend and run it on the last few inputs (or a zero input
        of the declared shape before any): every sample prepares, outputs are finite and as
        wide as the labels. A bundle that fails is deleted (``delete``)."""
        try:
            model = self.load(bundle)
            inputs = self.slot.recent()
            if not inputs:
                inputs = [np.zeros([max(d, 1) for d in model.sample_shape], np.float32)]
            for x in inputs:  # a ValueError of check_scores is a self-test failure below
                check_scores(model.predict(x), len(bundle.manifest.labels))
        except UpdateError as exc:
            exc.bundle = bundle.id  # type: ignore[attr-defined]
            if delete:
                shutil.rmtree(bundle.directory, ignore_errors=True)
            raise
        except (MedgeError, ValueError) as exc:
            if delete:
                shutil.rmtree(bundle.directory, ignore_errors=True)
            err = UpdateError(f"self-test: {exc}")
            err.bundle = bundle.id  # type: ignore[attr-defined]
            raise err from exc
        return model

    def rolled_back(self, bad: Bundle, restored: Bundle) -> None:
        """After a rollback: point the configured link back at the restored bundle (if it is a
        link) and delete the bad one, so a restart does not run it again."""
        link = self.current_link
        target = restored.directory
        if link is not None and target.absolute() == link.absolute():
            target = self._before_swap or target  # it was loaded through the link itself
        if link is not None and link.is_symlink() and link.resolve() != target.resolve():
            tmp = link.with_name(f".{link.name}.new")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(os.path.relpath(target.resolve(), link.parent))
            tmp.replace(link)
        if self.bundles in bad.directory.resolve().parents:
            shutil.rmtree(bad.directory, ignore_errors=True)
        state = self._read_state()
        if state.get("previous", {}) and state["previous"].get("id") == restored.id:
            self._remember(None, bundle=restored.id, previous=None)

    def _persist(self, final: Path) -> None:
        link = self.current_link
        if link is None or not link.is_symlink():
            log.info("%s: bundle is not a link: the update lasts until restart", self.device)
            return
        previous = link.resolve()
        self._before_swap = previous
        tmp = link.with_name(f".{link.name}.new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.path.relpath(final, link.parent))
        tmp.replace(link)  # atomic: a restart runs the old or the new, never neither
        keep = {final.resolve(), previous}
        for old in self.bundles.iterdir():  # keep the current and the previous one
            if old.is_dir() and old.resolve() not in keep and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)

    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self._state.read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def _last_issued(self) -> int:
        try:
            return int(self._read_state()["issued_ms"])
        except (ValueError, KeyError, TypeError):
            return 0

    def _remember(self, issued_ms: int | None, **fields: Any) -> None:
        """update.json: the last command's time (every command: none can be replayed), what
        the last update changed (``bundle``, ``previous``: id and folder) and the shadow run
        (``shadow``: folder, share, budget)."""
        state = {**self._read_state(), **fields}
        if issued_ms is not None:
            state["issued_ms"] = issued_ms
        tmp = self._state.with_name(self._state.name + ".new")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(state))
        tmp.replace(self._state)


def _unpack(archive: Path, dest: Path) -> None:
    """Unpack a bundle archive; links, devices and names outside ``dest`` are refused."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for m in tar.getmembers():
                if not (m.isfile() or m.isdir()):
                    raise UpdateError(f"archive member {m.name!r} is not a file")
                if Path(m.name).is_absolute() or ".." in Path(m.name).parts:
                    raise UpdateError(f"archive member {m.name!r} escapes the bundle")
            dest.mkdir(parents=True)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # pragma: no cover - Python < 3.10.12; members checked above
                tar.extractall(dest)  # noqa: S202
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UpdateError(f"archive is not a readable tar.gz ({exc})") from exc
