"""What a worker does so that a multi-node job stops as one: the job-wide abort and per-rank start-up.

- ``abort_job(message, code)``: a rank that must end the job (a configuration error: code 2; a collective
  timeout: code 3) publishes ``code`` and ``message`` on the workers' store (``MASTER_ADDR:MASTER_PORT``,
  hosted by rank 0 for each attempt of the group), so every rank on every node ends with the same code
  within about a second (``AbortListener``). With code 2 (a deterministic error: restarting cannot help)
  it also tells its own node's launcher (``launch/elastic.py``, through ``LCV_FATAL_FILE``), which stops
  its torchrun agent instead of restarting the workers, prints the message once and exits 2.
- ``AbortListener``: the thread every rank runs that watches for such a record.
- ``hydra_rank_overrides()``: ranks other than 0 do not write the run folder's shared files (``.hydra/``,
  ``lcv-train.log``); their logs are ``logs/rank<N>.log``.

Outside ``launch/torchrun.sh`` (one process, or a bare ``torchrun``) there is no ``LCV_FATAL_FILE``:
``abort_job`` then only publishes the record, and the caller prints and exits as usual.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import timedelta

log = logging.getLogger(__name__)

ABORT_KEY = "lcv/abort"
ACK_KEY = "lcv/abort_seen"
CONFIG_ERROR = 2  # deterministic: the launcher stops, no elastic restart
FAULT = 3  # a timeout or a lost rank: the launcher's restart policy applies


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _store_client(timeout_s: float):
    """A client of the workers' store, or None outside a multi-process job (or where the agent shares
    its own long-lived store with the workers, whose keys outlive an attempt)."""
    if _world() <= 1 or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return None
    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def _tell_launcher(message: str, code: int) -> bool:
    """Code 2 under launch/elastic.py: leave the message for this node's launcher and ask it to stop
    (SIGUSR2 to the agent, our parent). Only the first rank of the node to get here does; True if the
    launcher will print the message."""
    path = os.environ.get("LCV_FATAL_FILE")
    if code != CONFIG_ERROR or not path:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return True
    except OSError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(message.splitlines()[0] + "\n")
    try:
        os.kill(os.getppid(), signal.SIGUSR2)
    except OSError:
        return False
    return True


def abort_job(message: str, code: int, store=None, wait_for_ack_s: float = 5.0) -> bool:
    """Publish ``(code, message)`` to every rank, tell this node's launcher; True if the launcher prints
    the message (the caller then stays quiet). Never raises: the caller is already on its way out."""
    if _world() > 1:
        try:
            store = store or _store_client(timeout_s=5.0)
            if store is not None:
                store.compare_set(ABORT_KEY, "", json.dumps({"code": code, "message": message, "rank": _rank()}))
                if _rank() != 0:
                    store.add(ACK_KEY, 1)
                # Rank 0 hosts the store: give the others a moment to read the record before it goes away.
                deadline = time.monotonic() + wait_for_ack_s
                while _rank() == 0 and time.monotonic() < deadline and store.add(ACK_KEY, 0) < _world() - 1:
                    time.sleep(0.1)
        except Exception as e:  # noqa: BLE001  (the store may be gone with a lost node)
            log.warning("could not publish the abort to the other ranks: %s", e)
    return _tell_launcher(message, code)


class AbortListener:
    """A daemon thread that ends this process (``os._exit(code)``) when another rank publishes an abort.
    ``on_abort(message, code)`` runs first (e.g. a log line, a cleanup)."""

    def __init__(self, poll_s: float = 1.0, on_abort=None):
        self.poll_s = poll_s
        self.on_abort = on_abort
        self.store = None
        self._stop = threading.Event()
        self._thread = None
        if _world() > 1 and "MASTER_ADDR" in os.environ:
            self._thread = threading.Thread(target=self._run, name="lcv-abort-listener", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                if self.store is None:
                    self.store = _store_client(timeout_s=max(self.poll_s, 1.0))
                    if self.store is None:
                        return
                if not self.store.check([ABORT_KEY]):
                    continue
                record = json.loads(self.store.get(ABORT_KEY))
                if not record or record.get("rank") == _rank():
                    continue
                self.store.add(ACK_KEY, 1)
            except Exception:  # noqa: BLE001  (store not up yet, or gone: the collectives will say so)
                continue
            message, code = record["message"], int(record["code"])
            log.error("rank %s ended the job: %s", record.get("rank"), message)
            if self.on_abort is not None:
                try:
                    self.on_abort(message, code)
                except Exception:  # noqa: BLE001
                    pass
            printed_by_launcher = _tell_launcher(message, code)
            if not printed_by_launcher and code != CONFIG_ERROR:
                print(f"lcv-train: rank {_rank()}: stopping: rank {record.get('rank')} reported: {message}",
                      file=sys.stderr, flush=True)
            logging.shutdown()
            os._exit(code)


def hydra_rank_overrides(argv: list[str]) -> list[str]:
    """Hydra overrides for ranks other than 0: no ``.hydra/`` and no ``lcv-train.log`` in the shared run
    folder, and INFO lines not repeated on the terminal by every rank (they are in ``logs/rank<N>.log``)."""
    if _rank() == 0 or any(a.startswith("-") for a in argv):  # --help, --cfg, --multirun...: leave alone
        return []
    return ["hydra.output_subdir=null", "~hydra.job_logging.handlers.file",
            "hydra.job_logging.root.handlers=[console]", "++hydra.job_logging.handlers.console.level=WARNING"]
