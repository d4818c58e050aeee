"""The guest runtime's pause answers only once the container's cgroup is frozen (cgroup.events), and
fails, thawing the cgroup again, when it does not freeze in time. A fake cgroup directory stands in
for cgroupfs; the real pause runs in tests/integration/test_containers.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from schemas import agent as proto
from uvm.guest import runtime
from uvm.guest.runtime import Container, Runtime


class Replies:
    """What the runtime answers through its agent."""

    def __init__(self) -> None:
        self.ok: list[tuple[int, Any]] = []
        self.errors: list[tuple[int, str, str]] = []

    def reply(self, req_id: int, obj: Any) -> None:
        self.ok.append((req_id, obj))

    def reply_error(self, req_id: int, code: str, message: str) -> None:
        self.errors.append((req_id, code, message))


@pytest.fixture
def paused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Runtime, Replies, Container, Path]:
    monkeypatch.setattr(runtime, "CGROUP_ROOT", str(tmp_path))
    c = Container("c1", str(tmp_path / "bundle"))
    c.state = proto.PAUSED  # what crun pause's success left
    cgroup = Path(c.cgroup)
    cgroup.mkdir(parents=True)
    (cgroup / "cgroup.freeze").write_text("1\n")
    replies = Replies()
    return Runtime(replies), replies, c, cgroup  # type: ignore[arg-type]


def test_pause_is_answered_once_the_cgroup_is_frozen(paused: tuple[Runtime, Replies, Container, Path]) -> None:
    rt, replies, c, cgroup = paused
    (cgroup / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    rt.freezing[7] = (c, float("inf"))
    rt.check_frozen(7)
    rt.tick(0.0)
    assert replies.ok == [] and replies.errors == [] and 7 in rt.freezing  # still freezing: no answer yet
    (cgroup / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    rt.tick(0.0)
    assert replies.ok == [(7, {})] and not rt.freezing and c.state == proto.PAUSED


def test_pause_that_does_not_freeze_in_time_fails_and_thaws(paused: tuple[Runtime, Replies, Container, Path]) -> None:
    rt, replies, c, cgroup = paused
    (cgroup / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    rt.freezing[8] = (c, 0.0)  # the deadline has passed
    rt.tick(0.0)
    assert replies.ok == [] and not rt.freezing
    [(req_id, code, message)] = replies.errors
    assert (req_id, code) == (8, proto.E_INTERNAL) and "not frozen" in message
    assert (cgroup / "cgroup.freeze").read_text() == "0" and c.state == proto.RUNNING


def test_pause_of_a_container_whose_cgroup_is_gone_is_answered(paused: tuple[Runtime, Replies, Container,
                                                                              Path]) -> None:
    rt, replies, c, _ = paused
    rt.freezing[9] = (c, float("inf"))  # no cgroup.events: the container ended meanwhile
    rt.check_frozen(9)
    assert replies.ok == [(9, {})] and not rt.freezing
