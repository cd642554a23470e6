"""`mnist-torchrun`: torchrun itself (same arguments, same engine), ended by Ctrl-C in one line.

Ctrl-C reaches torchrun and every rank at once. torchrun's agent then raises SignalException
out of its main loop, a launcher traceback on top of the ranks' own output; the ranks end by
themselves (training.cli: rank 0 says how to resume, the others stay quiet). This entry point
runs torch.distributed.run's main unchanged and only turns that signal into exit 128+signal.
"""
from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main as torchrun_main


def main() -> None:
    try:
        torchrun_main()
    except SignalException as stop:
        sys.exit(128 + int(stop.sigval))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
