"""Run ``python -m dtop_kernels.train`` with a fault injected, for the crash tests.

    python tests/train_with_faults.py [--fault KIND:N] [--fault-rank R] TRAIN_ARGS...

KIND ``step``: the process kills itself (SIGKILL) when it computes the loss of iteration N
(1-based); ``save``: it kills itself halfway through writing its N-th checkpoint (a partial
temporary file is left); ``hang``: it sleeps forever at iteration N (a rank that stops answering).
``--fault-rank``: only the process of that rank (``RANK``) is faulty (default 0).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import dtop_kernels.models.checkpoint as ckpt
from dtop_kernels import train


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def inject(kind: str, n: int) -> None:
    if kind in ("step", "hang"):
        loss, calls = train.dtop_loss, [0]

        def faulty_loss(*a, **k):
            calls[0] += 1
            if calls[0] == n:
                _die() if kind == "step" else time.sleep(1e6)
            return loss(*a, **k)

        train.dtop_loss = faulty_loss
    elif kind == "save":
        save, write, saves = train.save_checkpoint, ckpt._Writer.write, [0]

        def counted_save(*a, **k):
            saves[0] += 1
            return save(*a, **k)

        def faulty_write(self, data):
            if saves[0] == n:  # half of this chunk reaches the disk, then the process dies
                self.f.write(bytes(data)[: max(len(data) // 2, 1)])
                self.f.flush()
                os.fsync(self.f.fileno())
                _die()
            return write(self, data)

        train.save_checkpoint = counted_save
        ckpt._Writer.write = faulty_write
    else:
        raise SystemExit(f"unknown fault {kind!r}")


def main(argv: list[str]) -> None:
    fault, rank = None, 0
    while argv and argv[0] in ("--fault", "--fault-rank"):
        if argv[0] == "--fault":
            fault = argv[1]
        else:
            rank = int(argv[1])
        argv = argv[2:]
    if fault and int(os.environ.get("RANK", "0")) == rank:
        kind, n = fault.split(":")
        inject(kind, int(n))
    train.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
