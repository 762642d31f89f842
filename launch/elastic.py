"""torchrun (``torch.distributed.run``, same arguments) that stops on a configuration error.

torchrun restarts the worker group after any failure; that is right for faults (a lost node, a killed
rank) and wrong for a configuration error, which the next attempt meets again. Here a worker that ends
the job with exit code 2 (``lcv_train.multinode``) writes its one-line message to ``LCV_FATAL_FILE``
(a fresh path this script exports) and sends this process ``SIGUSR2``; the agent then stops its workers
as on ``SIGTERM``, without a restart, and this script prints the message once and exits 2. Every node
does the same: the workers of the other nodes learn of the error through the workers' store.

    python launch/elastic.py [torchrun arguments] -m lcv_train [overrides]   (launch/torchrun.sh runs it)
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile


def _fatal_message(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.readline().strip() or "a worker ended the job with a configuration error"
    except OSError:
        return None


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    tmp = tempfile.mkdtemp(prefix="lcv-launch-")
    fatal = os.path.join(tmp, "fatal")
    os.environ["LCV_FATAL_FILE"] = fatal

    def stop_for_config_error(signum, frame):
        # The agent's own warnings about shutting down would bury the one line that matters.
        logging.disable(logging.WARNING)
        raise SignalException(f"Process {os.getpid()} got signal: {signal.SIGTERM}", sigval=signal.SIGTERM)

    signal.signal(signal.SIGUSR2, stop_for_config_error)
    try:
        try:
            torchrun(argv)
        except BaseException:
            message = _fatal_message(fatal)
            if message is None:
                raise
        else:
            message = _fatal_message(fatal)
            if message is None:
                return 0
        print(f"lcv-train: error: {message}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
