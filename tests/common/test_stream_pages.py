"""common.stream_pages: reads sized by the bytes of the entries before them."""

from __future__ import annotations

from common.stream_pages import FIRST_PAGE, PAGE_BUDGET_BYTES as READ_BUDGET_BYTES, ReadSize, entries_bytes
from shard.decode import MAX_ENTRY_BYTES


def entries(count: int, size: int) -> list:
    return [(b"1-%d" % n, [b"data", b"x" * (size - 4)]) for n in range(count)]


def test_the_first_read_asks_for_what_the_budget_holds_at_the_entry_limit() -> None:
    assert ReadSize(500).count == FIRST_PAGE == READ_BUDGET_BYTES // MAX_ENTRY_BYTES
    assert ReadSize(3).count == 3


def test_small_entries_make_whole_batches_and_large_ones_smaller_reads() -> None:
    size = ReadSize(500)
    size.saw(entries(8, 200))
    assert size.count == 500
    size.saw(entries(500, MAX_ENTRY_BYTES))
    assert size.count * MAX_ENTRY_BYTES <= READ_BUDGET_BYTES and size.count >= 1
    size.saw([])  # an empty read says nothing of sizes
    assert size.count * MAX_ENTRY_BYTES <= READ_BUDGET_BYTES
    size.saw(entries(2, 100) + [(b"1-9", None)])  # a deleted entry weighs nothing
    assert size.count == 500


def test_a_read_never_asks_for_none() -> None:
    size = ReadSize(500)
    size.saw(entries(1, 4 * READ_BUDGET_BYTES))
    assert size.count == 1


def test_entries_are_weighed_whichever_form_the_client_gives_their_fields() -> None:
    flat = [(b"1-1", [b"data", b"12345", b"pad", b"xx"])]
    mapping = [(b"1-1", {b"data": b"12345", b"pad": b"xx"})]
    assert entries_bytes(flat) == entries_bytes(mapping) == 14
    assert entries_bytes([(b"1-2", None)]) == 0
