"""The rendezvous store of a multi-node torchrun job, run on its own, outside every training agent.

torchrun's c10d rendezvous keeps its state in a TCP store. By default the agent of one node hosts it,
so losing that node ends the job for every node. Run this instead on a machine that outlives the
training nodes (a login node, a small VM, or one of the nodes if you accept that it must stay up), and
start every node with ``LCV_RDZV_IS_HOST=0 LCV_RDZV_ENDPOINT=<this host>:<port>``; any training node
can then be lost and replaced.

    python launch/rdzv_store.py [HOST:]PORT        # e.g. 0.0.0.0:29400; Ctrl-C or SIGTERM stops it

It holds only small rendezvous records (no training data) and serves any number of jobs as long as each
has its own rendezvous id (``LCV_RDZV_ID``). Restarting it while a job runs ends that job's rendezvous:
keep it up for the job's life. An etcd cluster you already run works the same way through torchrun's
``--rdzv-backend etcd-v2`` (``LCV_TORCHRUN_ARGS``); see the README.
"""

from __future__ import annotations

import signal
import sys
import threading
from datetime import timedelta


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    host, _, port = argv[0].rpartition(":")
    if not port.isdigit():
        print(f"rdzv_store.py: {argv[0]!r} is not [HOST:]PORT", file=sys.stderr)
        return 2
    import torch.distributed as dist

    try:
        store = dist.TCPStore(host or "0.0.0.0", int(port), is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=60))
    except Exception as e:  # noqa: BLE001  (port in use, bad address)
        print(f"rdzv_store.py: cannot serve on {argv[0]}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"rdzv_store.py: serving the rendezvous store on {host or '0.0.0.0'}:{store.port}", file=sys.stderr,
          flush=True)
    done.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
