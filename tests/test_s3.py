"""S3 specifics against moto's real HTTP server: request economy and storage_options."""

from __future__ import annotations

import os

import pytest
import torch

from tml_checkpointing import Snapshot, get_checkpoint, get_checkpoints
from tml_checkpointing.format.layout import COMMIT_MARKER

from .conftest import S3Server


def test_listing_many_checkpoints_takes_few_requests(s3_server: S3Server, s3_save_dir: str) -> None:
    with Snapshot(s3_save_dir, {"model": torch.nn.Linear(2, 2)}) as snapshot:
        for step in range(30):
            snapshot.save(step)
    before = s3_server.request_count()
    assert len(get_checkpoints(s3_save_dir)) == 30
    assert s3_server.request_count() - before <= 3  # one listing, not one request per entry


@pytest.mark.slow  # ~30 s: moto takes 4,000 PUTs to set up
def test_the_latest_of_2000_checkpoints_is_found_in_a_few_requests(
    s3_server: S3Server, s3_save_dir: str
) -> None:
    """Resuming asks for the newest checkpoint only: that costs a listing of the step names
    and a marker or two, never a request (or a listing page) per file of every checkpoint."""
    import s3fs

    fs = s3fs.S3FileSystem()
    root = s3_save_dir.removeprefix("s3://")
    objects = {}
    for step in range(2000):
        objects[f"{root}/{step}/{COMMIT_MARKER}"] = b"metadata"
        objects[f"{root}/{step}/0/model/weight"] = b"\0" * 16
    objects[f"{root}/2000/0/model/weight"] = b"\0" * 16  # a crash left the newest unmarked
    fs.pipe(objects)

    before = s3_server.request_count()
    assert get_checkpoint(s3_save_dir) == f"{s3_save_dir}/1999"
    requests = s3_server.request_count() - before
    assert requests <= 10, f"{requests} requests to find the latest of 2,000 checkpoints"
    # the whole list (every marker's state) is one recursive listing: a page per 1,000 keys
    before = s3_server.request_count()
    assert len(get_checkpoints(s3_save_dir)) == 2000
    assert s3_server.request_count() - before <= 6


def test_storage_options_reach_s3fs(s3_server: S3Server, s3_save_dir: str, monkeypatch) -> None:
    """Endpoint and keys given as storage_options, with no AWS_* environment at all."""
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    options = {"endpoint_url": s3_server.endpoint, "key": "testing", "secret": "testing"}
    model = torch.nn.Linear(3, 3)
    Snapshot(s3_save_dir, {"model": model}, storage_options=options).save(1).wait()
    assert "AWS_ENDPOINT_URL" not in os.environ
    fresh = torch.nn.Linear(3, 3)
    checkpoint = get_checkpoint(s3_save_dir, storage_options=options)
    Snapshot(s3_save_dir, {"model": fresh}, storage_options=options).restore(checkpoint)
    assert torch.equal(fresh.weight, model.weight)
