"""The soak's verdicts, its progress line, and its rows and time series in the Markdown report.

Flat, as judged here:
- Redis used_memory and XLEN: the reference is the highest value in the first retention
  period once trimming can have taken hold (samples from STREAM_RETENTION_MS + 30 s on, for
  one STREAM_RETENTION_MS); every later sample of the second half of the load must stay
  within +25 % of it (+1 MB for memory).
- Shard RSS: per shard slot, the highest VmRSS in the last third of the load minus the
  highest in the first third, at most RSS_GROWTH_MB (a restarted shard starts lower).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from scripts.benchmark.base import TARGET_P99_MS, fmt_int

FLAT_BAND = 0.25
RSS_GROWTH_MB = 8.0
SETTLE_AFTER_RETENTION_S = 30.0
EXPIRED = "processor_fixes_expired_total"
LOST = "processor_entries_lost_total"


def _mb(n_bytes_or_kb: float, kb: bool = False) -> float:
    return n_bytes_or_kb / 1024 if kb else n_bytes_or_kb / 2**20


def progress_line(s: Any, killer: Any, observer: Any) -> str:
    rss = " ".join(f"s{name.split()[1]} {_mb(kb, kb=True):.0f}" for name, kb in sorted(s.rss_kb.items())
                   if name.startswith("shard "))
    m = s.metrics or {}
    extra = "".join(f"  {label} {fmt_int(m[key])}" for key, label in ((EXPIRED, "expired"), (LOST, "lost")) if key in m)
    parts = "n/a" if s.partitions is None else f"{s.partitions}" + (f" ({len(observer.dropped)} dropped)"
                                                                     if observer.dropped else "")
    return (f"  [soak] {s.t:7.1f}s  sent {fmt_int(s.sent)}  stored {fmt_int(s.stored)}  pending {s.pending}  "
            f"XLEN {fmt_int(s.xlen)}  redis {_mb(s.used_memory):.1f} MB  RSS MB {rss or '-'}  "
            f"partitions {parts}  kills {len(killer.kills)}{extra}")


def _verdict(ok: bool | None, detail: str, hard: bool = False) -> dict[str, Any]:
    return {"ok": ok, "detail": detail, "hard": hard}


def _flat(samples: list[dict[str, Any]], key: str, load_s: float, retention_s: float, slack: float,
          show: Callable[[float], str]) -> dict[str, Any]:
    start = retention_s + SETTLE_AFTER_RETENTION_S
    ref = [s[key] for s in samples if start <= s["t"] < start + retention_s and s["t"] <= load_s]
    if not ref:
        ref = [s[key] for s in samples if start <= s["t"] <= load_s][:1]
    later = [s[key] for s in samples if s["t"] >= max(load_s / 2, start + retention_s) and s["t"] <= load_s + 1]
    if not ref or not later:
        return _verdict(None, f"run too short to judge (needs samples from {start:.0f} s on and in the second half)")
    limit = max(ref) * (1 + FLAT_BAND) + slack
    ok = max(later) <= limit
    return _verdict(ok, f"reference {show(max(ref))} (t {start:.0f}-{start + retention_s:.0f} s); second half "
                        f"{show(min(later))}..{show(max(later))}, limit {show(limit)}")


def _rss(samples: list[dict[str, Any]], load_s: float) -> dict[str, Any]:
    during = [s for s in samples if s["t"] <= load_s]
    slots = sorted({name for s in during for name in s["rss_kb"] if name.startswith("shard ")})
    if len(during) < 3 or not slots:
        return _verdict(None, "too few samples")
    third = max(1, len(during) // 3)
    details, ok = [], True
    for slot in slots:
        first = [s["rss_kb"][slot] for s in during[:third] if slot in s["rss_kb"]]
        last = [s["rss_kb"][slot] for s in during[-third:] if slot in s["rss_kb"]]
        if not first or not last:
            continue
        growth = (max(last) - max(first)) / 1024
        ok = ok and growth <= RSS_GROWTH_MB
        details.append(f"{slot}: {max(first) / 1024:.0f} -> {max(last) / 1024:.0f} MB ({growth:+.1f})")
    return _verdict(ok, "; ".join(details) + f" (first third vs last third, limit +{RSS_GROWTH_MB:g} MB)")


def verdicts(v: dict[str, Any]) -> dict[str, dict[str, Any]]:
    a, samples, load_s = v["accounting"], v["samples"], v["load_s"]
    retention_s = v["stream_retention_ms"] / 1000
    knows = v["processor_knows"]
    expired = "n/a (no processor_fixes_expired_total: counted as 0)" if a["expired"] is None else fmt_int(a["expired"])
    out = {
        "accounting": _verdict(a["exact"], f"produced {fmt_int(a['produced'])} = stored {fmt_int(a['stored'])} + "
                               f"expired {expired} + dead-lettered {fmt_int(a['dead_lettered'])} (cross-check, not "
                               f"exact across the restart: processor_entries_processed_total {a['processed_metric']})",
                               hard=True),
        "nothing_pending": _verdict(a["settled"] and a["pending"] == 0,
                                    f"pending {a['pending']}, lag {a['lag']} after the load", hard=True),
        "stored_rows_where_expected": _verdict(
            not a["hours_inconsistent"], f"{a['hours_kept']} hours of ts fully in positions, "
            f"{len(a['hours_dropped'])} fully dropped with their partition ({fmt_int(a['rows_in_dropped_partitions'])} "
            f"rows), inconsistent: {a['hours_inconsistent'] or 'none'}", hard=True),
        "kills_restarted": _verdict(all(k["restarted_after_s"] is not None for k in v["kills"]),
                                    f"{len(v['kills'])} kills, restarted after "
                                    f"{', '.join(str(k['restarted_after_s']) for k in v['kills']) or '-'} s", hard=True),
    }
    for i, name in enumerate(("start", "end")):
        w = v["latency"][i]
        out[f"latency_{name}_all_seen"] = _verdict(w["not_seen"] == 0, f"{w['not_seen']} of {w['fixes']} not seen",
                                                   hard=True)
        out[f"p99_{name}"] = _verdict(None if w["p99_ms"] is None else w["p99_ms"] <= TARGET_P99_MS,
                                      f"{w['p99_ms']} ms (p50 {w['p50_ms']} ms)")
    trim_note = "" if knows["STREAM_RETENTION_MS"] else " (this Processor does not read STREAM_RETENTION_MS)"
    for key, slack, show in (("used_memory", 2**20, lambda n: f"{_mb(n):.1f} MB"), ("xlen", 0, fmt_int)):
        f = _flat(samples, key, load_s, retention_s, slack, show)
        f["detail"] += trim_note
        out[f"{key}_flat"] = f
    out["shard_rss_flat"] = _rss(samples, load_s)
    plan, dropped = v["plan"], v["partitions_dropped"]
    with_rows = {n: d for n, d in dropped.items() if d["rows"]}
    if not plan["retention"]:
        out["partition_dropped"] = _verdict(None, "no retention phase (POSITIONS_RETENTION_DAYS unknown or positions "
                                                  "not partitioned)")
    else:
        out["partition_dropped"] = _verdict(bool(with_rows), f"{len(with_rows)} holding stored fixes dropped: " + (
            ", ".join(f"{n} ({fmt_int(d['rows'])} rows) at {d['gone_at_s']:.0f} s" for n, d in with_rows.items())
            or "none") + (f"; {len(dropped) - len(with_rows)} empty" if len(dropped) > len(with_rows) else ""))
    out["nothing_expired"] = _verdict(a["expired"] in (0, None), f"expired {expired} (the plan keeps every fix "
                                                                 "ahead of the horizon)")
    out["exit_codes"] = _verdict(all(c == 0 for c in v["exit_codes"]), f"{v['exit_codes']} after SIGTERM", hard=True)
    return out


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**NO**")


def soak_rows(label: str, v: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows of the benchmark's table for one soak result."""
    if "verdicts" not in v:
        return []
    d, a = v["verdicts"], v["accounting"]
    lat = v["latency"]
    rows = [
        (f"{label}: fixes produced / stored / expired / dead-lettered",
         f"{fmt_int(a['produced'])} / {fmt_int(a['stored'])} / "
         f"{'n/a' if a['expired'] is None else fmt_int(a['expired'])} / {fmt_int(a['dead_lettered'])}",
         "produced = sum, exact", _met(d["accounting"]["ok"])),
        (f"{label}: rows in positions at the end", f"{fmt_int(a['rows_in_positions'])} (+ {fmt_int(a['rows_in_dropped_partitions'])}"
         f" in {len(v['partitions_dropped'])} dropped partition(s))", "", _met(d["stored_rows_where_expected"]["ok"])),
        (f"{label}: pending after the load", str(a["pending"]), "0", _met(d["nothing_pending"]["ok"])),
    ]
    for i, name in enumerate(("start", "end")):
        w, (t0, t1) = lat[i], v["windows_s"][i]
        rows.append((f"{label}: latency at the {name} ({t0:.0f}-{t1:.0f} s)",
                     f"p50 {w['p50_ms']} ms, p99 {w['p99_ms']} ms, max {w['max_ms']} ms", f"p99 ≤ {TARGET_P99_MS:.0f} ms",
                     _met(d[f"p99_{name}"]["ok"])))
    rows += [
        (f"{label}: Redis used_memory flat", d["used_memory_flat"]["detail"], "≤ +25 %",
         _met(d["used_memory_flat"]["ok"])),
        (f"{label}: XLEN flat", d["xlen_flat"]["detail"], "≤ +25 %", _met(d["xlen_flat"]["ok"])),
        (f"{label}: shard RSS flat", d["shard_rss_flat"]["detail"], f"≤ +{RSS_GROWTH_MB:g} MB",
         _met(d["shard_rss_flat"]["ok"])),
        (f"{label}: partition dropped during the run", d["partition_dropped"]["detail"], "≥ 1 with rows",
         _met(d["partition_dropped"]["ok"])),
        (f"{label}: shards SIGKILLed", d["kills_restarted"]["detail"], "all restarted", _met(d["kills_restarted"]["ok"])),
        (f"{label}: achieved rate", f"{fmt_int(v['achieved_per_s'])}/s ({fmt_int(v['sent'])} sent)",
         f"{fmt_int(v['offered_per_s'])}/s offered", ""),
        (f"{label}: exit after SIGTERM", d["exit_codes"]["detail"] + _restart(v), "0", _met(d["exit_codes"]["ok"])),
    ]
    return [(a_, b.replace("|", "/"), c, m) for a_, b, c, m in rows]


def _restart(v: dict[str, Any]) -> str:
    r = v.get("restart") or {}
    if "exit_code" not in r:
        return ""
    return (f" (retention restart: SIGTERM at {r['sigterm_at_s']:.0f} s, exited after {r['exited_after_s']} s, "
            f"running again at {r['restarted_at_s']:.0f} s)")


def soak_series(label: str, v: dict[str, Any]) -> list[str]:
    """The samples as a Markdown table, and the plan and kills under it."""
    samples = v.get("samples") or []
    if not samples:
        return []
    slots = sorted({n for s in samples for n in s["rss_kb"] if n.startswith("shard ")})
    others = sorted({n for s in samples for n in s["rss_kb"] if not n.startswith("shard ")})
    keys = [k for k in (EXPIRED, LOST) if any(k in (s["metrics"] or {}) for s in samples)]
    head = (["t (s)", "sent", "stored", "pending", "XLEN", "used_memory MB"] + [f"{n} RSS MB" for n in slots + others]
            + ["partitions", "positions MB"] + [k.removeprefix("processor_").removesuffix("_total") for k in keys])
    lines = [f"{label}: samples", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in samples:
        m = s["metrics"] or {}
        cells = [f"{s['t']:.0f}", fmt_int(s["sent"]), fmt_int(s["stored"]), str(s["pending"]), fmt_int(s["xlen"]),
                 f"{_mb(s['used_memory']):.1f}"]
        cells += [f"{s['rss_kb'][n] / 1024:.1f}" if n in s["rss_kb"] else "-" for n in slots + others]
        cells += ["n/a" if s["partitions"] is None else str(s["partitions"]),
                  "n/a" if s["positions_mb"] is None else f"{s['positions_mb']:.0f}"]
        cells += [fmt_int(m[k]) if k in m else "-" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    kills = ", ".join(f"shard {k['slot']} at {k['t']:.0f} s (back after {k['restarted_after_s']} s)"
                      for k in v.get("kills", []))
    skipped = v.get("kills_skipped_at_s")
    lines += ["", f"Kills: {kills or 'none'}" + (f"; skipped at {skipped} s (latency windows, restart)" if skipped else "")
              + ".", f"Plan: {v.get('plan_text', '?')}.",
              f"Every fix was at least {v.get('min_ts_ahead_of_horizon_s')} s ahead of the retention horizon (after "
              f"the restart) and its ts at most {v.get('max_ts_ahead_of_clock_s')} s ahead of the clock (MAX_FUTURE_S "
              f"300). Processor reads: {v.get('processor_knows')}.", ""]
    return lines
