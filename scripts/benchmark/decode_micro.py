"""µs per entry of decoding and validating typical fleet entries, in one process, no servers.

Run as `python -m scripts.benchmark.decode_micro [--entries N] [--devices N] [--rounds N]`.
Entries are what tcp-ingestion XADDs for a Fleet (`io` included): a flat [b"data", json] list.
Each row is the best of --rounds passes over the same entries (the least disturbed by other
work on the machine):

    decode_entry        the shards' decoder (the msgspec fast path, where there is one)
    decode_entry_slow   the reference decoder (orjson + validation in Python)
    decode_batch        decode_entry plus the batch loop around it (shard/batch.py)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import orjson

from scripts.toolkit.fleet import Fleet
from shard.batch import decode_batch
from shard.decode import decode_entry, decode_entry_slow

BATCH = 1_000  # entries per decode_batch call, as a shard reads them (BATCH_SIZE's default)


def fleet_entries(count: int, devices: int) -> list[list[bytes]]:
    return [[b"data", orjson.dumps(fix)] for fix in Fleet(devices).fixes(count)]


def best_us(run: Callable[[], None], count: int, rounds: int) -> float:
    """The fastest of `rounds` runs, in µs per entry."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best * 1e6 / count


def measure(entries: list[list[bytes]], rounds: int) -> dict[str, float]:
    """Every row decodes BATCH entries at a time and keeps their fixes until the next, as a shard does."""
    not_after = datetime.now(timezone.utc) + timedelta(days=365 * 50)  # Fleet dates are fixed: none in the future
    chunks = [entries[i : i + BATCH] for i in range(0, len(entries), BATCH)]
    rows: dict[str, Callable[[list[bytes], datetime], object]] = {
        "decode_entry": decode_entry, "decode_entry_slow": decode_entry_slow,
    }
    results = {}
    for name, decoder in rows.items():
        results[name] = best_us(
            lambda: [[decoder(fields, not_after) for fields in chunk] for chunk in chunks], len(entries), rounds
        )
    now = time.time()
    max_future_s = 50 * 365 * 86_400.0
    batches = [[(b"%d-0" % i, fields) for i, fields in enumerate(chunk)] for chunk in chunks]
    results["decode_batch"] = best_us(
        lambda: [decode_batch(batch, 5, max_future_s, now) for batch in batches], len(entries), rounds  # type: ignore[arg-type]
    )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--devices", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    entries = fleet_entries(args.entries, args.devices)
    size = sum(len(fields[1]) for fields in entries) / len(entries)
    print(f"{len(entries):,} fleet entries of {args.devices:,} devices, {size:.0f} bytes of data each; best of {args.rounds}")
    for name, us in measure(entries, args.rounds).items():
        print(f"  {name:<18} {us:6.2f} µs/entry")


if __name__ == "__main__":
    main()
