"""``python -m training.schedule``: retraining on a schedule, as a detached Ray actor that outlives crashes.

    .venv/bin/python -m training.schedule start --address auto --every-h 24   # once, on the head node
    .venv/bin/python -m training.schedule status --address auto
    .venv/bin/python -m training.schedule stop --address auto
    .venv/bin/python -m training.schedule start --every-h 24 -- --no-download   # extra retrain arguments

Why the loop lives in the constructor: Ray restarts a crashed actor (``max_restarts=-1``) by running
its ``__init__`` again, but it does not re-send a method call that was running when the process
died unless ``max_task_retries`` says so, and a ``run_forever()`` call would then never return to
be retried cleanly anyway. A schedule started by ``run_forever.remote()`` therefore stops silently
after the first crash. Here ``__init__`` arms a timer thread, so every restart re-arms it.

Why the times are kept in a state file (``schedule.json`` beside ``Settings.retrain_log``): a restart
must neither fire a round at once nor wait a whole period again; the next round is due
``period_s`` after the last one started, whichever process started it. Why a lock file is held by
the round's process: a round outlives the actor that started it (a SIGKILLed actor leaves its child
running), so the restarted actor skips a round while the previous one still holds the lock.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

NAME, NAMESPACE = "retrain-scheduler", "ml-engine"


class RetrainScheduler:
    """Runs ``command`` every ``period_s`` seconds (the retraining round by default); see module doc."""

    def __init__(self, period_s: float, command: Sequence[str] | None = None, *, workdir: str | None = None,
                 state_path: str | None = None, log_path: str | None = None, first_delay_s: float = 0.0):
        from configs.settings import PROJECT_DIR, get_settings

        folder = get_settings().retrain_log.parent
        self.period_s = float(period_s)
        self.command = list(command or [sys.executable, "-m", "training.retrain"])
        self.workdir = workdir or str(PROJECT_DIR)
        self.state_path = Path(state_path or folder / "schedule.json")
        self.log_path = Path(log_path or folder / "schedule.log")
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        state = self._read()
        state["starts"] = state.get("starts", 0) + 1  # 1 = first start; more = restarts after crashes
        state.setdefault("runs", 0)
        state.setdefault("next_due", time.time() + first_delay_s)
        state.update(pid=os.getpid(), period_s=self.period_s, command=self.command)
        self._write(state)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="retrain-schedule", daemon=True)
        self._thread.start()

    # ---- state -------------------------------------------------------------------------------------
    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    def _write(self, state: dict[str, Any]) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_path)

    def _update(self, **changes: Any) -> None:
        state = self._read()
        state.update(changes)
        self._write(state)

    # ---- the schedule ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            wait = self._read().get("next_due", 0) - time.time()
            if wait > 0:
                self._stop.wait(min(wait, 60.0))  # re-read: `stop` or a new period may have changed it
                continue
            self._update(next_due=time.time() + self.period_s)
            self._run_once()

    def _run_once(self) -> None:
        """One round, holding the lock file for as long as the round's process lives."""
        lock = open(self.state_path.with_suffix(".lock"), "w")
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._update(last_skip=time.time(), last_skip_reason="the previous round is still running")
                return
            started = time.time()
            self._update(last_start=started)
            with open(self.log_path, "a") as log:
                log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(started))} {self.command}\n")
                log.flush()
                rc = subprocess.run(self.command, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                    pass_fds=(lock.fileno(),)).returncode
            state = self._read()
            self._update(runs=state.get("runs", 0) + 1, last_rc=rc, last_end=time.time())
        finally:
            lock.close()

    # ---- remote API --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {**self._read(), "alive": self._thread.is_alive()}

    def stop(self) -> dict[str, Any]:
        """Stops the timer (a running round finishes); the caller then kills the actor."""
        self._stop.set()
        self._thread.join(timeout=5)
        return self.status()


def remote_class():
    """The actor class: restarted forever after a crash; its constructor re-arms the schedule."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=-1)(RetrainScheduler)


def start(period_s: float, command: Sequence[str] | None = None, **kwargs: Any):
    """The named detached scheduler of the connected cluster (created if absent; an existing one is kept)."""
    return remote_class().options(name=NAME, namespace=NAMESPACE, lifetime="detached",
                                  get_if_exists=True).remote(period_s, command, **kwargs)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.schedule", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("start", "status", "stop"))
    p.add_argument("--address", default="auto", help="Ray cluster to join (default: auto, the local head)")
    p.add_argument("--every-h", type=float, default=24.0, help="hours between rounds (default 24)")
    p.add_argument("--first-in-h", type=float, default=0.0, help="hours until the first round (default: now)")
    p.add_argument("retrain_args", nargs=argparse.REMAINDER, help="after --: arguments of training.retrain")
    return p


def main(argv: list[str] | None = None) -> int:
    import ray

    args = parser().parse_args(argv)
    ray.init(address=args.address, namespace=NAMESPACE, configure_logging=False, log_to_driver=False)
    if args.action == "start":
        extra = [a for a in args.retrain_args if a != "--"]
        command = [sys.executable, "-m", "training.retrain", *extra]
        actor = start(args.every_h * 3600, command, first_delay_s=args.first_in_h * 3600)
        print(json.dumps(ray.get(actor.status.remote())))
        return 0
    try:
        actor = ray.get_actor(NAME, namespace=NAMESPACE)
    except ValueError:
        print(f"error: no {NAME} actor in namespace {NAMESPACE}", file=sys.stderr)
        return 2
    if args.action == "status":
        print(json.dumps(ray.get(actor.status.remote())))
        return 0
    print(json.dumps(ray.get(actor.stop.remote())))
    ray.kill(actor, no_restart=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
