"""Reading a checkpoint back: its small files, its chain, its bytes, verified.

- ``metadata``: the commit marker and the sidecar, read (storage faults named).
- ``chains``: following a delta's chain: ancestors, links checked, where each tensor lives.
- ``verify``: ``verify_checkpoint``, ``get_latest_valid_checkpoint``.
- ``shapes``: a checkpoint's shapes against the state about to be restored.
- ``fast_restore``: a checkpoint restored in place on every rank, sequential and verified.
- ``shard_reads``: which bytes of saved shards land in this rank's local shards.
- ``file_reads``: sorted, coalesced, block-verified range reads of one file.
- ``delta_rows``: one delta piece's changed rows applied to what this rank holds.
- ``restore``: the one restore path of ``Snapshot.restore`` (checks, then fast or torchsnapshot).
- ``weights``: one tensor read into place (``Snapshot.load_snapshot_to_weight``).
"""
