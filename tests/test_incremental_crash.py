"""Incremental checkpoints under SIGKILL, corruption and pruning.

Why: a delta checkpoint is only as good as its chain. A kill between a delta's data and its
marker, a committed delta whose prune never ran, or a prune killed half-way through deleting a
chain must never leave a committed checkpoint that cannot be rebuilt bit-exactly; a corrupt
or replaced ancestor must make every checkpoint built on it corrupt (and resume falls back
past them); retention must keep every base a kept delta needs.

The kill loop works as tests/test_crash.py: victims (tests/helpers/crash_saver.py
``--incremental``) report every library event and pause at a chosen (event, occurrence); the
test SIGKILLs them there and proves from storage where the kill landed. Each victim life
saves a full checkpoint first (it resumed: nothing staged to compare with), then deltas,
then a full one every ``FULL_EVERY`` saves, so the n-th save of a life is a delta exactly
when ``(n - 1) % FULL_EVERY`` is not 0; the files and chain links on storage must agree.
The state at each step is a pure function of the step (``incremental_state``), so the test
knows what every checkpoint must hold.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import pytest
import torch

from tml_checkpointing import (
    DELETE_DONE,
    DELETE_STARTED,
    DELETE_UNCOMMITTED,
    SAVE_COMMITTED,
    SAVE_DATA_WRITTEN,
    SAVE_SIDECAR_WRITTEN,
    SAVE_STARTED,
    CorruptCheckpointError,
    RetentionPolicy,
    Snapshot,
    find_incomplete,
    get_checkpoints,
    get_latest_valid_checkpoint,
    join_url,
    prune,
    step_from_checkpoint,
    verify_checkpoint,
)
from tml_checkpointing.format.chain_link import ChainLink
from tml_checkpointing.format.layout import is_data_file
from tml_checkpointing.lifecycle.deletion import delete_checkpoint
from tml_checkpointing.reading.chains import read_chain_link

from .conftest import S3Server
from .helpers.crash_saver import (
    CHANGED_ROWS,
    DENSE_SHAPE,
    FULL_EVERY,
    KEEP_LAST,
    TABLE_DIM,
    TABLE_ROWS,
    IncrementalModel,
    advance_table,
    dense_weights,
    incremental_snapshot,
    incremental_state,
)
from .helpers.event_protocol import DirModel
from .test_crash import Zygote

HELPER = "tests.helpers.crash_saver"
REPO = Path(__file__).resolve().parents[1]
SAVE_EVENTS = (SAVE_STARTED, SAVE_DATA_WRITTEN, SAVE_SIDECAR_WRITTEN, SAVE_COMMITTED)
DELETE_EVENTS = (DELETE_STARTED, DELETE_UNCOMMITTED, DELETE_DONE)
MOMENTS = SAVE_EVENTS + DELETE_EVENTS
LOCAL_RANDOM_KILLS = 25
S3_RANDOM_KILLS = 2
SEED = int(os.environ.get("TML_CRASH_SEED", "20261130"))
# Bytes of the data files (float32): the dense layer and the table are each a multiple of the
# staging alignment, so a full save's batched file holds both, a delta's only the dense layer,
# and the delta file the indices (int64) and values of exactly the rows that changed.
DENSE_BYTES = DENSE_SHAPE[0] * DENSE_SHAPE[1] * 4
FULL_BYTES = DENSE_BYTES + TABLE_ROWS * TABLE_DIM * 4
DELTA_FILE_BYTES = CHANGED_ROWS * (8 + TABLE_DIM * 4)


@dataclass(frozen=True)
class Order:
    """Pause at the ``occurrence``-th ``event`` (of a full checkpoint only, ``only_full``)."""

    event: str
    occurrence: int
    only_full: bool = False


# Planned moments: the data of a delta save written (2nd save of a life is a delta), its
# sidecar too (3rd), a committed delta with its prune pending, and a prune half-done whose
# victim is a chain base (marker gone; about to go; gone).
PLANNED = [
    Order(SAVE_DATA_WRITTEN, 2),
    Order(SAVE_SIDECAR_WRITTEN, 3),
    Order(SAVE_COMMITTED, 2),
    Order(DELETE_UNCOMMITTED, 1, only_full=True),
    Order(DELETE_STARTED, 1, only_full=True),
    Order(SAVE_COMMITTED, 4),
    Order(DELETE_DONE, 1, only_full=True),
]


@dataclass
class Kill:
    """Where a victim was stopped, and what it reported before."""

    order: Order
    path: str
    resumed_from: int
    events: list[tuple[str, str]]  # (name, path), in order, the pause event last
    links: dict[int, ChainLink]  # of the saves this victim committed and waited for


@dataclass
class Tally:
    """What the loop covered, asserted at its end (and printed with ``-s``)."""

    kills: int = 0
    in_delta_save: int = 0  # killed during a save that the schedule makes a delta
    in_full_save: int = 0
    in_prune: int = 0
    on_base: int = 0  # killed while deleting a full checkpoint whose deltas this prune deleted
    delta_steps: set[int] = field(default_factory=set)  # committed deltas seen after a kill
    bases_beyond_window: set[int] = field(default_factory=set)  # kept only for a delta


class IncrementalZygote:
    """tests/test_crash.py's helper process in ``--incremental`` mode; kills reported with
    their :class:`Order` and parsed chain links."""

    def __init__(self) -> None:
        self.helper = Zygote("--incremental")

    def run_and_kill(self, save_dir: str, order: Order) -> Kill:
        kill = self.helper.run_and_kill(save_dir, order.event, order.occurrence, order.only_full)
        links = {step: ChainLink.from_json(text) for step, text in kill.links.items()}
        return Kill(order, kill.path, kill.resumed_from, kill.events, links)

    def close(self) -> None:
        self.helper.close()


@pytest.fixture(scope="module")
def zygote(s3_server: S3Server) -> Iterator[IncrementalZygote]:
    """Started after the S3 fixture so it inherits the AWS_* endpoint variables."""
    helper = IncrementalZygote()
    try:
        yield helper
    finally:
        helper.close()


@functools.cache
def expected(step: int) -> dict[str, torch.Tensor]:
    return incremental_state(step)


def stored_files(checkpoint: str) -> dict[str, int]:
    """Every file under ``checkpoint`` (relative name -> size), fresh from storage."""
    fs, root = fsspec.core.url_to_fs(checkpoint)
    fs.invalidate_cache()
    root = root.rstrip("/")
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {key[len(root) + 1 :]: int(info["size"]) for key, info in found.items()}


def restore_matches(save_dir: str, checkpoint: str) -> None:
    """``checkpoint`` restores, into a fresh state, bit-exactly the state of its step."""
    model = IncrementalModel()
    Snapshot(save_dir, {"model": model}).restore(checkpoint, verify="full")
    want = expected(step_from_checkpoint(checkpoint))
    for name, value in model.state_dict().items():
        assert torch.equal(value, want[name]), f"{checkpoint}: {name} differs"


def ancestors(step: int, links: dict[int, ChainLink]) -> list[int]:
    """The steps of ``step``'s chain below it, parent first."""
    found = []
    link = links[step]
    while link.parent is not None:
        parent = int(link.parent)
        found.append(parent)
        link = links[parent]
    return found


class KillLoop:
    """Runs victims against one save_dir and proves each landing from storage."""

    def __init__(self, zygote: IncrementalZygote, save_dir: str) -> None:
        self.zygote = zygote
        self.save_dir = save_dir
        self.model = DirModel()
        self.links: dict[int, ChainLink] = {}  # newest known link of each step
        self.listings: dict[int, dict[str, int]] = {}  # files of incomplete dirs, last kill
        self.tally = Tally()

    def run(self, orders: list[Order]) -> Tally:
        for order in orders:
            self.prove(self.zygote.run_and_kill(self.save_dir, order))
        return self.tally

    def prove(self, kill: Kill) -> None:
        where = f"killed at {kill.order} {kill.path}"
        assert kill.resumed_from == max(self.model.committed, default=-1), where
        for name, path in kill.events:
            self.model.apply(name, step_from_checkpoint(path))
        self.links.update(kill.links)
        committed = {step_from_checkpoint(p) for p in get_checkpoints(self.save_dir)}
        assert committed == self.model.committed, where
        incomplete = {entry.step for entry in find_incomplete(self.save_dir, 0)}
        assert incomplete == self.model.incomplete, where
        for step in committed:  # links of checkpoints committed by this victim, from storage
            link = read_chain_link(join_url(self.save_dir, str(step)))
            assert link is not None, f"{where}: committed {step} has no chain link"
            assert self.links.setdefault(step, link) == link, f"{where}: {step} link changed"

        self.tally.kills += 1
        if kill.order.event in SAVE_EVENTS:
            self.prove_save(kill, committed, where)
        else:
            self.prove_delete(kill, committed, incomplete, where)
        self.check_all(committed, where)
        self.listings = {
            step: stored_files(join_url(self.save_dir, str(step))) for step in incomplete
        }

    def prove_save(self, kill: Kill, committed: set[int], where: str) -> None:
        """The n-th save of a life is a delta iff ``(n - 1) % FULL_EVERY``; storage agrees."""
        saves = sum(1 for name, _ in kill.events if name == SAVE_STARTED)
        delta = (saves - 1) % FULL_EVERY != 0
        if delta:
            self.tally.in_delta_save += 1
        else:
            self.tally.in_full_save += 1
        step = step_from_checkpoint(kill.path)
        earlier = self.listings.get(step, {})
        fresh = {n: s for n, s in stored_files(kill.path).items() if n not in earlier}
        if kill.order.event == SAVE_STARTED:
            assert step not in committed and not fresh, f"{where}: {fresh}"
            return
        if kill.order.event in (SAVE_DATA_WRITTEN, SAVE_SIDECAR_WRITTEN):
            assert step not in committed and step in self.model.incomplete, where
            data = sorted(n for n in fresh if is_data_file(n))
            deltas = [n for n in data if n.startswith("delta/")]
            batched = [n for n in data if n.startswith("batched/")]
            assert len(batched) == 1, f"{where}: data files {data}"
            assert len(deltas) == (1 if delta else 0), f"{where}: delta={delta}, files {data}"
            sizes = [fresh[batched[0]], *(fresh[name] for name in deltas)]
            want = [DENSE_BYTES, DELTA_FILE_BYTES] if delta else [FULL_BYTES]
            assert sizes == want, f"{where}: delta={delta}, sizes {sizes}, expected {want}"
            return
        assert kill.order.event == SAVE_COMMITTED
        assert step in committed and step == max(committed), where
        link = self.links[step]
        assert link.is_delta == delta, f"{where}: link {link}"
        if delta:
            assert link.parent == str(step - 1), f"{where}: link {link}"
            assert link.parent_id == self.links[step - 1].id, f"{where}: link {link}"
            assert link.depth == (saves - 1) % FULL_EVERY, f"{where}: link {link}"
            assert [t.rows for t in link.tensors] == [CHANGED_ROWS], f"{where}: link {link}"

    def prove_delete(
        self, kill: Kill, committed: set[int], incomplete: set[int], where: str
    ) -> None:
        self.tally.in_prune += 1
        step = step_from_checkpoint(kill.path)
        link = self.links[step]  # it was committed when the prune chose it
        if kill.order.only_full:
            assert not link.is_delta, f"{where}: {link}"
        if kill.order.event == DELETE_STARTED:
            assert step in committed, where
        elif kill.order.event == DELETE_UNCOMMITTED:
            assert step not in committed and step in incomplete, where
        else:
            assert not stored_files(kill.path), where
            assert step not in committed | incomplete, where
        # Children first: no committed delta names a victim of this prune as its parent.
        for child in committed:
            parent = self.links[child].parent
            assert parent is None or int(parent) in committed, f"{where}: {child} -> {parent}"
        if not link.is_delta:
            prune_start = max(
                i for i, (name, _) in enumerate(kill.events) if name == SAVE_COMMITTED
            )
            deleted = {
                step_from_checkpoint(path)
                for name, path in kill.events[prune_start:]
                if name == DELETE_DONE
            }
            if any(self.links[d].parent == str(step) for d in deleted):
                self.tally.on_base += 1

    def check_all(self, committed: set[int], where: str) -> None:
        """Every committed checkpoint verifies ("full") and restores its step's state; no
        chain is broken; the newest valid is the newest committed; bases are kept."""
        for step in sorted(committed):
            checkpoint = join_url(self.save_dir, str(step))
            report = verify_checkpoint(checkpoint, level="full", raise_on_corrupt=False)
            assert report.status == "valid", f"{where}: {checkpoint}: {report.summary()}"
            link = self.links[step]
            if link.is_delta:
                self.tally.delta_steps.add(step)
                assert link.parent is not None and int(link.parent) in committed, where
                assert self.links[int(link.parent)].id == link.parent_id, where
            restore_matches(self.save_dir, checkpoint)
        newest = max(committed, default=None)
        latest = get_latest_valid_checkpoint(self.save_dir, verify="full")
        assert latest == ("" if newest is None else join_url(self.save_dir, str(newest))), where
        window = sorted(committed)[-KEEP_LAST:]
        needed = {a for step in window for a in ancestors(step, self.links)}
        self.tally.bases_beyond_window |= needed - set(window)
        assert needed <= committed, f"{where}: a kept delta lost its base"


def random_orders(count: int, seed: int, max_occurrence: int) -> list[Order]:
    chooser = random.Random(seed)
    return [
        Order(chooser.choice(MOMENTS), chooser.randint(1, max_occurrence)) for _ in range(count)
    ]


@pytest.mark.slow  # kills processes (tests/conftest.py tiers); the other tests here are quick
def test_sigkill_incremental_saves_and_prunes_local(
    zygote: IncrementalZygote, tmp_path: Path
) -> None:
    orders = PLANNED + random_orders(LOCAL_RANDOM_KILLS, SEED, max_occurrence=6)
    tally = KillLoop(zygote, str(tmp_path / "run")).run(orders)
    print(f"\nlocal kill loop: {tally}")
    assert tally.kills == len(orders)
    assert tally.in_delta_save >= 3 and tally.in_prune >= 3, tally
    assert tally.on_base >= 1, "no kill landed half-way through deleting a chain base"
    assert len(tally.delta_steps) >= 5, "too few committed deltas: saves were not incremental"
    assert tally.bases_beyond_window, "no base was ever kept for a delta outside keep_last"


@pytest.mark.slow
def test_sigkill_incremental_saves_and_prunes_s3(
    zygote: IncrementalZygote, s3_save_dir: str
) -> None:
    orders = [
        Order(SAVE_DATA_WRITTEN, 2),
        Order(SAVE_COMMITTED, 3),
        Order(DELETE_UNCOMMITTED, 1, only_full=True),
    ]
    orders += random_orders(S3_RANDOM_KILLS, SEED + 1, max_occurrence=3)
    tally = KillLoop(zygote, s3_save_dir).run(orders)
    print(f"\ns3 kill loop: {tally}")
    assert tally.kills == len(orders)
    assert tally.in_delta_save >= 2 and tally.in_prune >= 1, tally
    assert tally.delta_steps, "no committed delta on S3"


# -- in-process: corruption, broken links, pruning a long chain ----------------------------


def save_steps(snapshot: Snapshot, model: IncrementalModel, steps: range) -> dict[int, ChainLink]:
    """Save ``steps`` (consecutive) with the state of each step; their chain links."""
    links = {}
    with torch.no_grad():
        model.load_state_dict(expected(steps[0]))
        for step in steps:
            if step != steps[0]:
                advance_table(model.table.weight, step)
                model.dense.weight.copy_(dense_weights(step))
            pending = snapshot.save(step)
            pending.wait()
            assert pending.link is not None
            links[step] = pending.link
    return links


def report_of(save_dir: str, step: int) -> tuple[str, str]:
    report = verify_checkpoint(join_url(save_dir, str(step)), level="full", raise_on_corrupt=False)
    return report.status, report.summary()


def test_corrupt_base_takes_down_its_chain_only(tmp_path: Path) -> None:
    """Chain A (0-3) intact, chain B (4-7) the newest with a flipped byte in its base: all of
    B is corrupt, naming the ancestor; A stays valid and resume falls back to 3."""
    save_dir = str(tmp_path / "run")
    model = IncrementalModel()
    with incremental_snapshot(save_dir, model) as snapshot:
        links = save_steps(snapshot, model, range(8))
    assert [links[s].parent for s in range(8)] == [None, "0", "1", "2", None, "4", "5", "6"]
    base = tmp_path / "run" / "4"
    (data,) = (base / "batched").iterdir()
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))

    for step in range(4):
        assert report_of(save_dir, step)[0] == "valid", step
        restore_matches(save_dir, join_url(save_dir, str(step)))
    status, summary = report_of(save_dir, 4)
    assert status == "corrupt" and "batched/" in summary, summary
    for step in (5, 6, 7):
        status, summary = report_of(save_dir, step)
        assert status == "corrupt", step
        assert f"ancestor {join_url(save_dir, '4')} is corrupt" in summary, summary
    assert get_latest_valid_checkpoint(save_dir, verify="full") == join_url(save_dir, "3")
    with pytest.raises(CorruptCheckpointError):
        Snapshot(save_dir, {"model": IncrementalModel()}).restore(
            join_url(save_dir, "7"), verify="full"
        )


def test_corrupt_delta_takes_down_itself_and_its_descendants(tmp_path: Path) -> None:
    """A flipped byte in a delta's own file (the changed rows): it and the deltas after it
    are corrupt, its ancestors are not, and resume falls back to its parent."""
    save_dir = str(tmp_path / "run")
    model = IncrementalModel()
    with incremental_snapshot(save_dir, model) as snapshot:
        save_steps(snapshot, model, range(4))  # 0 full, 1-3 deltas
    (rows,) = (tmp_path / "run" / "2" / "delta").iterdir()
    raw = bytearray(rows.read_bytes())
    raw[-1] ^= 0x80  # a value of the last changed row
    rows.write_bytes(bytes(raw))
    assert [report_of(save_dir, step)[0] for step in range(4)] == [
        "valid",
        "valid",
        "corrupt",
        "corrupt",
    ]
    assert f"ancestor {join_url(save_dir, '2')} is corrupt" in report_of(save_dir, 3)[1]
    assert get_latest_valid_checkpoint(save_dir, verify="full") == join_url(save_dir, "1")
    restore_matches(save_dir, join_url(save_dir, "1"))
    with pytest.raises(CorruptCheckpointError):
        Snapshot(save_dir, {"model": IncrementalModel()}).restore(
            join_url(save_dir, "3"), verify="full"
        )


def test_deleted_or_replaced_parent_breaks_the_child(tmp_path: Path) -> None:
    """A delta whose parent is gone, or is another save at the same step, is corrupt (the
    message names the parent), and resume falls back past it."""
    save_dir = str(tmp_path / "run")
    model = IncrementalModel()
    with incremental_snapshot(save_dir, model) as snapshot:
        save_steps(snapshot, model, range(3))  # 0 full, 1-2 deltas
    parent = join_url(save_dir, "1")
    delete_checkpoint(parent)
    status, summary = report_of(save_dir, 2)
    assert status == "corrupt" and f"parent {parent}" in summary, summary
    assert "not committed" in summary, summary
    assert get_latest_valid_checkpoint(save_dir, verify="full") == join_url(save_dir, "0")
    with pytest.raises(CorruptCheckpointError, match=r"chain (is )?broken"):
        Snapshot(save_dir, {"model": IncrementalModel()}).restore(join_url(save_dir, "2"))

    other = IncrementalModel()  # the same step saved again: a full one with another link id
    with incremental_snapshot(save_dir, other) as snapshot:
        again = save_steps(snapshot, other, range(1, 2))[1]
    assert again.parent is None
    status, summary = report_of(save_dir, 2)
    assert status == "corrupt" and f"parent {parent} is another checkpoint" in summary, summary
    assert get_latest_valid_checkpoint(save_dir, verify="full") == parent
    restore_matches(save_dir, parent)


def test_prune_long_chain_keeps_survivors_bases(tmp_path: Path) -> None:
    """keep_last=1 on a long chain: the newest delta keeps its whole chain (and nothing
    else); the older chain is deleted; what is left verifies and restores."""
    save_dir = str(tmp_path / "run")
    model = IncrementalModel()
    with Snapshot(
        save_dir, {"model": model}, incremental=True, full_every=8, min_chained_bytes=64 * 1024
    ) as snapshot:
        links = save_steps(snapshot, model, range(14))  # chain 0-7, chain 8-13
    assert [s for s, link in links.items() if not link.is_delta] == [0, 8]
    result = prune(save_dir, RetentionPolicy(keep_last=1))
    kept = sorted(step_from_checkpoint(p) for p in get_checkpoints(save_dir))
    assert kept == list(range(8, 14)), kept
    assert sorted(step_from_checkpoint(p) for p in result.deleted) == list(range(8))
    for step in range(8, 13):
        assert "base of the kept delta checkpoint 13" in result.plan.reasons[step], step
    for step in kept:
        assert report_of(save_dir, step)[0] == "valid", step
        restore_matches(save_dir, join_url(save_dir, str(step)))
