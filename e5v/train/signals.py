"""Stop on SIGTERM / Ctrl-C at the end of the current step, after writing a checkpoint."""

from __future__ import annotations

import sys
from typing import Any

from e5v import distributed as D


class StopOnSignal:
    """SIGTERM (what SLURM and torchrun send first) or Ctrl-C (SIGINT) asks for a checkpoint at the end of
    the current step, then exit 143 / 130. A second Ctrl-C stops at once (KeyboardInterrupt). Every rank
    must agree before stopping, so the flag is all-reduced."""

    def __init__(self) -> None:
        import signal
        import threading

        self._flag = False
        self.name, self.exit_code = "SIGTERM", 143
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        if signum == signal.SIGINT:
            if self._flag:  # the second Ctrl-C: the user wants out now
                raise KeyboardInterrupt
            self.name, self.exit_code = "Ctrl-C (SIGINT)", 130
            if D.is_main():
                print("\nCtrl-C: finishing this step and writing a checkpoint (Ctrl-C again to abort at once)",
                      file=sys.stderr, flush=True)
        self._flag = True

    def requested(self) -> bool:
        return D.any_rank(self._flag)

    def restore(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
