"""Phase deadlines: a rank stuck in a collective ends the job with a line naming the step and the phase.

The trainer marks where it is (``enter("forward", step)``, ``"backward"``, ``"optimizer"``, ``"sync"``
(the end-of-step stop flag), ``"save"``, ``"sample"``; ``leave()`` outside the loop): two attribute
writes, no lock, no host sync. A daemon thread checks once a second; a phase that lasts longer than its
limit (``trainer.collective_timeout_s``; ``trainer.save_timeout_s`` for saves, samples and the first step
of each attempt, which includes warm-up) makes this rank

1. log and print ``lcv-train: error: step N: phase <phase> still running after <T> s ...``,
2. remove a half-written checkpoint (rank 0: ``checkpoints/*.tmp``, as the next start would),
3. publish the abort to every rank (``lcv_train.multinode``), and exit with code 3.

Code 3 is a fault, not a configuration error: under ``launch/torchrun.sh`` the group is restarted from
the latest checkpoint while restarts remain (a lost or frozen node comes back that way); otherwise the
job ends. The process group's own timeout is set to the longest limit plus a margin, as a backstop.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from lcv_train.multinode import FAULT, AbortListener, abort_job

log = logging.getLogger(__name__)

LONG_PHASES = ("save", "sample", "startup")


class PhaseWatchdog:
    def __init__(self, collective_timeout_s: float, save_timeout_s: float, on_timeout=None, poll_s: float = 1.0,
                 exit_process: bool = True, enabled: bool | None = None):
        """``enabled``: run the thread (default: when this process is one of several ranks)."""
        self.collective_timeout_s = collective_timeout_s
        self.save_timeout_s = save_timeout_s
        self.on_timeout = on_timeout  # cleanup before exit, e.g. remove a half-written checkpoint
        self.poll_s = poll_s
        self.exit_process = exit_process
        self.phase: str | None = None
        self.step = 0
        self.started = 0.0
        self.limit = 0.0
        self.fired: str | None = None  # the message, once fired (for tests with exit_process=False)
        self._first_step: int | None = None
        self._stop = threading.Event()
        self.listener = AbortListener(poll_s, on_abort=lambda message, code: self._cleanup())
        if enabled is None:
            enabled = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if enabled:
            threading.Thread(target=self._run, name="lcv-phase-watchdog", daemon=True).start()

    # -- called by the trainer -------------------------------------------------------------------
    def enter(self, phase: str, step: int) -> None:
        if self._first_step is None and phase not in LONG_PHASES:
            self._first_step = step
        long = phase in LONG_PHASES or step == self._first_step
        self.limit = self.save_timeout_s if long else self.collective_timeout_s
        self.step, self.started, self.phase = step, time.monotonic(), phase

    def leave(self) -> None:
        self.phase = None

    def close(self) -> None:
        self.phase = None
        self._stop.set()
        self.listener.close()

    # -- the thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            phase, started, limit, step = self.phase, self.started, self.limit, self.step
            if phase is None or time.monotonic() - started <= limit:
                continue
            key = "save_timeout_s" if limit == self.save_timeout_s else "collective_timeout_s"
            message = (f"step {step}: phase {phase} still running after {limit:g} s on rank "
                       f"{os.environ.get('RANK', '0')} (trainer.{key}={limit:g}): a rank is stuck or a node is "
                       f"lost; ending this attempt (it resumes from the latest checkpoint if restarted)")
            self.fired = message
            log.error(message)
            print(f"lcv-train: error: {message}", file=sys.stderr, flush=True)
            self._cleanup()
            abort_job(message, FAULT, store=self.listener.store, wait_for_ack_s=2.0)
            if not self.exit_process:
                return
            logging.shutdown()
            os._exit(FAULT)

    def _cleanup(self) -> None:
        if self.on_timeout is not None:
            try:
                self.on_timeout()
            except Exception as e:  # noqa: BLE001
                log.warning("cleanup after the timeout failed: %s", e)
