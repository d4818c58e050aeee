"""What the bench reads from /proc and how it summarises runs (shared by bench.py and its sections)."""

from __future__ import annotations

import statistics
from pathlib import Path


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def alive(pid: int) -> bool:
    """Whether pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def pss_kib(pid: int, field: str = "Pss") -> int:
    """A field of /proc/<pid>/smaps_rollup (Pss, Pss_Anon, Pss_File...), in KiB."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/smaps_rollup: no {field} line")


def mapping_pss_kib(pid: int, size_kib: int) -> int:
    """Pss of the anonymous mappings of exactly size_kib in pid (QEMU's guest RAM block), in KiB."""
    total, size, anon = 0, 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's header: range perms offset dev inode [path]
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            size, anon = (hi - lo) >> 10, len(fields) < 6
        elif fields[0] == "Pss:" and anon and size == size_kib:
            total += int(fields[1])
    return total


def smaps_split(pid: int, path: str) -> dict[str, float]:
    """QEMU's PSS (MiB): total, the part in mappings of path (the template RAM file), the rest, and USS."""
    total = in_path = uss = 0
    current = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):
            current = fields[5] if len(fields) >= 6 else ""
        elif fields[0] == "Pss:":
            total += int(fields[1])
            if current == path:
                in_path += int(fields[1])
        elif fields[0] in ("Private_Clean:", "Private_Dirty:"):
            uss += int(fields[1])
    return {"pss_mib": total / 1024, "template_pss_mib": in_path / 1024, "own_pss_mib": (total - in_path) / 1024,
            "uss_mib": uss / 1024}
