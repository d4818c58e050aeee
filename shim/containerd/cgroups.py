"""The host's accounting of a pod: the shim and its QEMU run in the sandbox's cgroup (Kata's
sandbox_cgroup_only), so the orchestrator's pod limits and PodSandboxStats cover the whole VM.

The sandbox's spec names it in ``linux.cgroupsPath``, as runc reads it: a path (cgroupfs: ``/kubepods/
besteffort/pod<uid>/<id>``) or systemd's ``slice:prefix:name`` (``kubepods-besteffort-pod<uid>.slice:
cri-containerd:<id>``, expanded as systemd nests slices). On a cgroup v2 host it is one directory under
/sys/fs/cgroup; on a v1 host one in every mounted hierarchy. The shim moves itself there before it
starts QEMU, which inherits it; at the end it moves back and removes the directories it made (never
one it found: a kubelet's pod cgroup is the kubelet's).
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from uvm import errors

log = logging.getLogger("uvmshim.cgroups")

CGROUP_ROOT = Path("/sys/fs/cgroup")


def relative_path(cgroups_path: str) -> str:
    """cgroupsPath as a path relative to a hierarchy's root. Raises InvalidArgumentError."""
    if ":" in cgroups_path and not cgroups_path.startswith("/"):
        parts = cgroups_path.split(":")
        if len(parts) != 3 or not all(parts[1:]):
            raise errors.InvalidArgumentError(f"linux.cgroupsPath {cgroups_path!r}: not slice:prefix:name")
        slice_, prefix, name = parts
        path = "/".join([*expand_slice(slice_ or "system.slice", cgroups_path), f"{prefix}-{name}.scope"])
    else:
        path = cgroups_path.strip("/")
    if not path or ".." in path.split("/") or not re.fullmatch(r"[A-Za-z0-9_.:@=+,/-]+", path):
        raise errors.InvalidArgumentError(f"linux.cgroupsPath {cgroups_path!r}: not a usable cgroup path")
    return path


def expand_slice(slice_: str, cgroups_path: str) -> list[str]:
    """A systemd slice as the directories it nests in, as runc's ExpandSlice reads it: a-b-c.slice is
    a.slice/a-b.slice/a-b-c.slice; -.slice is the root. Raises InvalidArgumentError for a name systemd
    refuses (no .slice suffix, a '/', an empty dash-separated component: test--a.slice, -test.slice)."""
    name = slice_.removesuffix(".slice")
    if name == slice_ or "/" in slice_:
        raise errors.InvalidArgumentError(f"linux.cgroupsPath {cgroups_path!r}: {slice_!r} is not a slice name")
    if name == "-":
        return []
    words = name.split("-")
    if not all(words):
        raise errors.InvalidArgumentError(f"linux.cgroupsPath {cgroups_path!r}: {slice_!r} is not a slice name "
                                          "(an empty dash-separated part)")
    return ["-".join(words[: n + 1]) + ".slice" for n in range(len(words))]


def hierarchies() -> list[Path]:
    """The mounted cgroup hierarchies: /sys/fs/cgroup on a v2 host; every v1 hierarchy otherwise."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" - ")
            if len(fields) == 2 and fields[1].split()[0] == "cgroup":
                found.append(Path(fields[0].split()[4]))
    return sorted(set(found))


@dataclass
class Placement:
    """Where a process was moved to, what was made for it, and where it came from."""

    made: list[Path] = field(default_factory=list)  # created directories, shallowest first
    joined: list[Path] = field(default_factory=list)
    origin: dict[Path, Path] = field(default_factory=dict)  # hierarchy -> the process's previous cgroup

    def undo(self, pid: int) -> None:
        """pid back where it was, then the directories made for it removed (deepest first); what cannot be
        removed (a process left in it) is logged."""
        for previous in self.origin.values():
            with contextlib.suppress(OSError):
                (previous / "cgroup.procs").write_text(str(pid))
        for d in reversed(self.made):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("cgroup %s: not removed: %s", d, e.strerror)
        self.made.clear()
        self.joined.clear()


def _current(hierarchy: Path, pid: int) -> Path:
    """pid's cgroup in hierarchy (from /proc/<pid>/cgroup)."""
    with open(f"/proc/{pid}/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    if hierarchy == CGROUP_ROOT and (CGROUP_ROOT / "cgroup.controllers").exists():
        rel = next((p for h, c, p in lines if h == "0"), "/")
    else:
        names = set(hierarchy.name.split(","))
        rel = next((p for h, c, p in lines if names & set(c.replace("name=", "").split(","))), "/")
    return hierarchy / rel.lstrip("/")


def place(pid: int, cgroups_path: str) -> Placement:
    """Move pid into cgroups_path in every hierarchy, making what is missing. Raises InvalidArgumentError
    naming the cgroup (everything undone)."""
    rel = relative_path(cgroups_path)
    placement = Placement()
    try:
        for hierarchy in hierarchies():
            target = hierarchy / rel
            missing = [p for p in [target, *target.parents] if p.is_relative_to(hierarchy) and not p.exists()]
            for d in reversed(missing):
                d.mkdir()
                placement.made.append(d)
                for knob in ("cpuset.cpus", "cpuset.mems"):  # v1 cpuset: empty ones refuse every task
                    if (d / knob).exists() and not (d / knob).read_text().strip():
                        (d / knob).write_text((d.parent / knob).read_text())
            placement.origin[hierarchy] = _current(hierarchy, pid)
            (target / "cgroup.procs").write_text(str(pid))
            placement.joined.append(target)
    except OSError as e:
        placement.undo(pid)
        raise errors.InvalidArgumentError(f"linux.cgroupsPath {cgroups_path!r}: cannot join {e.filename}: "
                                          f"{e.strerror}") from None
    log.info("pid %d in cgroup %s (%d hierarchies)", pid, rel, len(placement.joined))
    return placement

