"""Writing a staged save in a thread of the training process, for stores only it can reach.

Why: ``memory://`` lives in one process, and a filesystem registered at runtime is unknown to
the writer process, so an incremental save there (which needs the staging block that holds
the last saved copy) is written by this thread instead: the same steps as the writer process
(:func:`~tml_checkpointing.writing.staged_write.write_staged`), the same bytes, the same commit.
"""

from __future__ import annotations

import threading
from types import TracebackType

from ..storage.filesystem import StorageOptions
from ..storage.plugin import FsspecStoragePlugin
from .staged_write import write_staged
from .staging import StagedSave, StagingArea
from .writer_process import save_command

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class ThreadSave:
    """One save written by a thread; shaped like torchsnapshot's pending snapshot."""

    def __init__(
        self, url: str, storage_options: StorageOptions, area: StagingArea, staged: StagedSave
    ) -> None:
        self.exc_info: ExcInfo | None = None
        self._area: StagingArea | None = area  # keeps the block alive while it is written
        self._command = save_command(url, storage_options, area, staged)
        self.thread = threading.Thread(target=self._run, name="tml-writer-thread", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            assert self._area is not None
            plugin = FsspecStoragePlugin(self._command["url"], self._command["storage_options"])
            buffer = self._area.memory.buf
            assert buffer is not None
            write_staged(plugin, buffer, self._command)
        except BaseException as error:
            self.exc_info = (type(error), error, error.__traceback__)
        finally:
            self._area = None
