"""Run the ``tml`` CLI with its library events reported, optionally pausing at one of them.

    python -m tests.helpers.run_with_events [--events-fd FD] [--pause EVENT[:N]] train ...

(from the repository root; as a module, so that this folder does not come first on
``sys.path``, where its files would shadow top-level packages such as ``recipes``.)

Subscribes an :class:`~tests.helpers.event_protocol.Reporter` to ``tml_checkpointing.events``
(lines on ``FD``, default stdout: better a pipe of its own, as the CLI's own output is
buffered and could interleave), then calls ``flows.cli.main`` with the remaining arguments
in this very process, where training and its saves run. With ``--pause``, the N-th event of
that name blocks the thread that emitted it, so a test can SIGKILL the process group at
exactly that moment ("data written, marker pending", "committed, prune pending", ...).
"""

from __future__ import annotations

import argparse
import sys

from flows.cli import main as tml_main
from tests.helpers.event_protocol import Reporter, parse_pause
from tml_checkpointing import EVENT_NAMES, subscribe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events-fd", type=int, default=1, metavar="FD")
    parser.add_argument("--pause", default=None, metavar="EVENT[:N]")
    parser.add_argument("tml_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    pause, occurrence = parse_pause(args.pause) if args.pause else (None, 1)
    if pause is not None and pause not in EVENT_NAMES:
        parser.error(f"unknown event {pause!r}; one of {', '.join(EVENT_NAMES)}")
    subscribe(Reporter(args.events_fd, pause, occurrence))
    return tml_main(args.tml_args)


if __name__ == "__main__":
    sys.exit(main())
