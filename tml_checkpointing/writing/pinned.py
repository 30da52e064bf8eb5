"""Page-locking a staging block for CUDA: non-blocking device-to-host copies into shared memory.

Why: a copy from GPU memory into pageable host memory is staged by the driver through a
bounce buffer and blocks the host thread; into page-locked memory it is one DMA that runs while
the host goes on. The staging block is already allocated once and reused, so registering it
with CUDA (``cudaHostRegister``) once costs nothing per save, and the writer process still maps
the very same pages. One ``synchronize`` per save waits for all the copies at once.

Never used on a machine without CUDA (a plan with only CPU tensors asks for no registration).
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from multiprocessing import shared_memory

import torch

#: ``cudaHostRegisterPortable``: the pages are pinned for every CUDA context of the process.
_REGISTER_PORTABLE = 1


class PinnedRegistration:
    """A shared-memory block registered as page-locked host memory, until :meth:`release`."""

    def __init__(self, memory: shared_memory.SharedMemory, size: int) -> None:
        self._pointer = 0
        self._lock = threading.Lock()
        if not torch.cuda.is_available():
            return
        buffer = memory.buf
        assert buffer is not None
        pointer = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        status = torch.cuda.cudart().cudaHostRegister(  # type: ignore[no-untyped-call]
            pointer, size, _REGISTER_PORTABLE
        )
        if int(status) == 0:  # cudaSuccess; otherwise copies still work, only slower
            self._pointer = pointer

    @property
    def registered(self) -> bool:
        return self._pointer != 0

    def synchronize(self) -> None:
        """Wait for the copies issued into the block (all devices of the process)."""
        if torch.cuda.is_available():
            for device in range(torch.cuda.device_count()):
                torch.cuda.synchronize(device)

    def release(self) -> None:
        """Unpin (idempotent; runs from the block's finalizer, must not raise)."""
        with self._lock:
            pointer, self._pointer = self._pointer, 0
        if pointer:
            with contextlib.suppress(RuntimeError):
                torch.cuda.cudart().cudaHostUnregister(pointer)  # type: ignore[no-untyped-call]
