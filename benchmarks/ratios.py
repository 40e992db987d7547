"""Ours against the official code from the JSON lines of one call (stdin): one line per case.

Training: official ms/step over ours (synced, and back to back where both have it), so above 1
means faster. Sampling: ours ms/image over official (below 1 means faster), as the issues state it.
Where both ran with ``--clocks``, each side's median SM clock and board power go beside the ratio,
and where NVML counted energy, each side's joules per step (per batch for sampling) and their
ratio, oriented as the time ratio: at a power limit a step takes about its energy over the limit,
so the joules explain the ratio (RESULTS.md rounds 23 and 24).

    bash benchmarks/suite.sh versus              # calls this at the end
    python benchmarks/ratios.py < results.jsonl
"""

from __future__ import annotations

import json
import sys


def _clocks(off: dict, ours: dict, key: str, ours_over_official: bool = False) -> dict:
    """Each side's median SM clock and power from its ``key`` clock stats, where both have them,
    and their joules per call with the official's over ours (or ours over the official's)."""
    a, b = off.get(key) or {}, ours.get(key) or {}
    out = {}
    if "sm_mhz_median" in a and "sm_mhz_median" in b:
        out.update(official_sm_mhz=a["sm_mhz_median"], ours_sm_mhz=b["sm_mhz_median"],
                   official_power_w=a["power_w_median"], ours_power_w=b["power_w_median"])
    if a.get("joules_per_call") and b.get("joules_per_call"):
        ja, jb = a["joules_per_call"], b["joules_per_call"]
        out.update(official_joules=ja, ours_joules=jb,
                   joules_ratio=round(jb / ja if ours_over_official else ja / jb, 3))
    return out


def ratios(records: list[dict]) -> list[dict]:
    by = {(r.get("bench"), r.get("depth"), r.get("batch"), r.get("tag")): r for r in records if "error" not in r}
    out = []
    for (bench, depth, batch, tag), ours in by.items():
        if bench == "train_step" and ("official_train_step", depth, batch, None) in by:
            off = by[("official_train_step", depth, batch, None)]
            row = {"ratio": "train_speedup", "depth": depth, "batch": batch, "tag": tag,
                   "official_ms": off["ms_median"], "ours_ms": ours["ms_median"],
                   "speedup_synced": round(off["ms_median"] / ours["ms_median"], 3)}
            if "pipelined_ms_median" in off and "pipelined_ms_median" in ours:
                row["speedup_back_to_back"] = round(off["pipelined_ms_median"] / ours["pipelined_ms_median"], 3)
            out.append({**row, **_clocks(off, ours, "pipelined_clocks")})
        if bench == "sample" and ("official_sample", depth, batch, None) in by:
            off = by[("official_sample", depth, batch, None)]
            out.append({"ratio": "sample_time", "depth": depth, "batch": batch, "tag": tag,
                        "official_ms_per_image": off["ms_per_image"], "ours_ms_per_image": ours["ms_per_image"],
                        "ours_over_official": round(ours["ms_per_image"] / off["ms_per_image"], 3),
                        **_clocks(off, ours, "clocks", ours_over_official=True)})
    return out


def main() -> None:
    records = []
    for line in sys.stdin:
        line = line.strip()
        if line.startswith("{"):
            records.append(json.loads(line))
    for row in ratios(records):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
