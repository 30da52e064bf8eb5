"""The on-disk format: what the files of a save_dir are called and what they hold.

Pure functions of names and bytes; reading and writing them is the other rooms' work.

- ``layout``: every on-disk name, canonical step names, "is committed", a listing by step.
- ``markers``: the commit marker's content (torchsnapshot metadata) and the files it names.
- ``sidecar``: the ``.integrity.json`` format: block checksums, recording, checking a read.
- ``chain_link``: the incremental link format: how a delta names its parent and its rows.
- ``torchsnapshot_compat``: where we lean on torchsnapshot internals (manifest, resharding).
"""
