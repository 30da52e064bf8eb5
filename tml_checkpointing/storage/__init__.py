"""Storage: the store under every checkpoint, reached through fsspec.

- ``filesystem``: the one place URLs become fsspec filesystems; S3 timeouts and retries;
  joining and splitting URLs; atomic replace, fsync, listings, modification times.
- ``faults``: storage faults named (``CheckpointReadError`` / ``CheckpointWriteError``),
  never mistaken for corruption.
- ``locking``: one writer per save_dir (``WriterLock``, compare-and-swap take-over).
- ``plugin``: torchsnapshot's ``StoragePlugin`` over fsspec: sidecar, verified reads, commit.
"""
