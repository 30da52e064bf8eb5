"""Writing a checkpoint: from the training thread's copy to the commit marker.

- ``save_protocol``: the first steps of every save (lock held, step free, claim, event).
- ``claims``: ``.writing``: a save in flight is visible to cleanup.
- ``writers``: which writer takes a save (writer process, writer thread, torchsnapshot).
- ``chain_cursor``: where the next incremental save attaches (the chain's tip).
- ``incremental``: which tensors are chained, and which of their rows changed.
- ``save_plan``: what one rank stages (local shards, the replicated part once) and where.
- ``staging``: the shared-memory staging block, one per state layout.
- ``pinned``: the block page-locked for CUDA copies.
- ``background``: staging in a thread while training's next update waits for it.
- ``rank_commit``: several ranks, one checkpoint (reports to rank 0 through the store).
- ``writer_process``: the training side of the writer process (start, hand over, events).
- ``writer_main``: the writer process itself (``python -m tml_checkpointing.writing.writer_main``).
- ``parent_death``: child processes (the writer, ``torchrun``, ranks) that end with their parent.
- ``writer_thread``: a staged save written in-process (``memory://``).
- ``staged_write``: the writing steps of one staged save, for both writers.
- ``torchsnapshot_writer``: torchsnapshot's own writer thread, for the rest.
- ``pending``: ``PendingSave``, the handle every writer returns.
- ``materialize``: any checkpoint written out as a full, plain torchsnapshot one.
"""
