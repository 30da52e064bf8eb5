"""Helpers shared by the training tests: reference runs and tensor-by-tensor comparison."""

from __future__ import annotations

from typing import Any

import torch
from torchsnapshot.manifest import ShardedTensorEntry
from torchsnapshot.serialization import string_to_dtype

from tml_checkpointing import Snapshot
from tml_checkpointing.format.chain_link import DELTA_ROOT
from tml_checkpointing.reading.chains import link_of
from training.config import TrainConfig, TrainOptions
from training.determinism import set_deterministic
from training.loop import EpochResult, train_epoch
from training.session import close_session, get_session


def flow_params(**params: Any) -> tuple[TrainConfig, TrainOptions]:
    """The ``train`` flow's two parameters from flat keyword arguments (each field goes to the
    model that declares it), as tests once passed them to the flow."""
    options = {name: params.pop(name) for name in list(params) if name in TrainOptions.model_fields}
    return TrainConfig(**params), TrainOptions(**options)


def plain_run(config: TrainConfig, epochs: range | None = None) -> list[EpochResult]:
    """Train with the plain functions only (no Prefect): the reference behaviour."""
    set_deterministic()
    try:
        session = get_session(config)
        return [train_epoch(session, epoch) for epoch in epochs or range(config.epochs)]
    finally:
        close_session(config)


def checkpoint_tensors(save_dir: str, step: int | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (model, optimizer, RNG), by ranked path.

    A table sharded over ranks (TorchRec) is read whole, from every rank's shards, under the
    path of the lowest rank that holds a shard of it: the result does not depend on how many
    ranks saved it or how it was split.
    """
    snapshot = Snapshot.get_torch_snapshot(save_dir, global_step=step)
    assert snapshot is not None, f"no checkpoint in {save_dir}"
    manifest = snapshot.get_manifest()
    tensors = {
        path: snapshot.read_object(path)
        for path, entry in manifest.items()
        if getattr(entry, "type", "") == "Tensor"
    }
    sharded: dict[str, tuple[str, list[int]]] = {}  # logical path -> (lowest ranked path, shape)
    for path, entry in sorted(manifest.items(), key=lambda item: int(item[0].split("/")[0])):
        if not isinstance(entry, ShardedTensorEntry):
            continue
        ranked, shape = sharded.setdefault(path.split("/", 1)[1], (path, []))
        for piece in entry.shards:
            ends = [o + n for o, n in zip(piece.offsets, piece.sizes, strict=True)]
            shape[:] = [max(pair) for pair in zip(shape or ends, ends, strict=True)]
    for ranked, shape in sharded.values():
        full = torch.empty(shape)
        snapshot.read_object(ranked, obj_out=full)
        tensors[ranked] = full
    # A delta checkpoint (incremental saves): its chained tensors rebuilt from the chain, in
    # place of its rows/values parts, so that it compares with a full one tensor by tensor.
    tensors = {path: t for path, t in tensors.items() if not path.startswith(f"0/{DELTA_ROOT}/")}
    link = link_of(snapshot.metadata, snapshot.path)
    for chained in link.tensors if link is not None else ():
        full = torch.empty(chained.shape, dtype=string_to_dtype(chained.dtype))
        Snapshot.load_snapshot_to_weight(snapshot, chained.path, full)
        tensors[f"0/{chained.path}"] = full
    return tensors


def assert_bit_identical(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> None:
    assert actual.keys() == expected.keys()
    assert any(k.startswith("0/model/") for k in expected)
    assert any(k.startswith("0/optimizer/") for k in expected)
    different = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not different, f"tensors differ: {different[:10]}"
