"""Lock-race helper: a zygote that forks N processes which all try to take one writer lock.

Importing the library (torch) costs seconds; forking an initialised process costs
milliseconds, so a race of 8 real processes stays fast. Protocol, one line each way (every line
written with one ``os.write``, so lines of concurrent processes never mix):

    test -> zygote:  {"save_dir": ..., "n": 8, "ttl": 120, "storage_options": {...}}  (JSON)
    contender i:     "ready <i>"            its WriterLock is built; it now blocks on the go pipe
    test -> zygote:  "go"                   the zygote closes the go pipe: every contender's
                                            blocking read returns at the same moment
    contender i:     "won <i> <token>" | "refused <i>" | "error <i> <Type>: <message>"
    test -> zygote:  "release"              winners release, everyone exits
    zygote -> test:  "done <exit statuses>"

The go pipe is the barrier: no contender starts before all are ready, and none waits on a
clock. Winners keep the lock until "release", so a late contender can never win a lock that a
fast winner already gave back.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

from tml_checkpointing.errors import SaveDirLockedError
from tml_checkpointing.storage.locking import WriterLock


def say(line: str) -> None:
    os.write(1, (line.replace("\n", " ") + "\n").encode())


def contend(index: int, order: dict[str, object], go: int, hold: int) -> None:
    """One contender (a forked child): build, wait for go, try, report, wait, release."""
    lock = WriterLock(
        str(order["save_dir"]),
        owner=f"contender {index}",
        ttl_seconds=float(order.get("ttl", 120)),  # type: ignore[arg-type]
        storage_options=order.get("storage_options"),  # type: ignore[arg-type]
    )
    say(f"ready {index}")
    os.read(go, 1)  # EOF once the zygote closes the write end: all wake together
    won = False
    try:
        lock.acquire()
        won = True
        say(f"won {index} {lock._token}")
    except SaveDirLockedError:
        say(f"refused {index}")
    except Exception as error:
        say(f"error {index} {type(error).__name__}: {error}")
    os.read(hold, 1)
    if won:
        lock.release()


def main() -> None:
    for line in sys.stdin:
        order = json.loads(line)
        go_read, go_write = os.pipe()
        hold_read, hold_write = os.pipe()
        children = []
        for index in range(int(order["n"])):
            pid = os.fork()
            if pid == 0:
                os.close(go_write)
                os.close(hold_write)
                code = 0
                try:
                    contend(index, order, go_read, hold_read)
                except BaseException:
                    say(f"error {index} {traceback.format_exc()}")
                    code = 1
                os._exit(code)
            children.append(pid)
        os.close(go_read)
        os.close(hold_read)
        assert sys.stdin.readline().strip() == "go"
        os.close(go_write)
        assert sys.stdin.readline().strip() == "release"
        os.close(hold_write)
        statuses = [os.waitpid(pid, 0)[1] for pid in children]
        say("done " + " ".join(str(status) for status in statuses))


if __name__ == "__main__":
    main()
