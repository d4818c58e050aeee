"""runuvm's command line: exec's options before or after the id, as runc takes them; the Python
client's argv; delete's and the stdio relay's clean-up (no VM)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from shim.runuvm import cli
from shim.runuvm import commands as runuvm
from shim.runuvm.client import Runuvm


def parse_exec(*words: str) -> Any:
    parser = cli._parser()
    args = parser.parse_args(["exec", *words])
    cli._exec_options(parser, args)
    return args


@pytest.mark.parametrize(("words", "want"), [
    (["c1", "--", "ls", "-l"], dict(args=["ls", "-l"], detach=False, tty=False, pid_file=None, process=None)),
    (["c1", "-d", "--pid-file", "/p", "--", "ls"], dict(args=["ls"], detach=True, pid_file=Path("/p"))),
    (["-d", "--pid-file", "/p", "c1", "--", "ls"], dict(args=["ls"], detach=True, pid_file=Path("/p"))),
    (["c1", "-t", "sh", "-c", "echo -d"], dict(args=["sh", "-c", "echo -d"], tty=True, detach=False)),
    (["-t", "c1", "sh"], dict(args=["sh"], tty=True)),
    (["c1", "--process", "p.json"], dict(args=[], process=Path("p.json"))),
    (["c1", "--pid-file=/q", "-d", "true"], dict(args=["true"], pid_file=Path("/q"), detach=True)),
])
def test_exec_options_before_or_after_the_id(words: list[str], want: dict[str, Any]) -> None:
    args = parse_exec(*words)
    assert args.id == "c1"
    for key, value in want.items():
        assert getattr(args, key) == value, key


def test_an_unknown_exec_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_exec("c1", "--nope", "--", "ls")
    assert info.value.code == 2
    assert "--nope" in capsys.readouterr().err


def test_the_client_gives_exec_options_that_the_cli_parses_as_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        seen.append(argv)
        return subprocess.CompletedProcess(argv, 0, b"", b"")

    monkeypatch.setattr(subprocess, "run", fake_run)
    client = Runuvm(root=Path("/r"), command=["runuvm"])
    client.exec("c1", ["ls", "--all"], detach=True, pid_file=Path("/p"))
    client.exec("c1", process_file=Path("/proc.json"))
    for argv in seen:
        words = argv[argv.index("exec") + 1:]
        args = parse_exec(*words)
        assert args.id == "c1"
    first, second = (parse_exec(*a[a.index("exec") + 1:]) for a in seen)
    assert (first.detach, first.pid_file, first.args) == (True, Path("/p"), ["ls", "--all"])
    assert (second.process, second.args) == (Path("/proc.json"), [])


def _container_dir(root: Path, cid: str) -> Path:
    d = root / cid
    d.mkdir(parents=True)
    (d / runuvm.STATE).write_text(json.dumps({"id": cid, "bundle": "/nowhere"}))
    return d


def test_delete_keeps_a_container_whose_shim_lives_but_does_not_answer(tmp_path: Path) -> None:
    """A State that fails while the shim daemon lives is not a dead shim: plain delete refuses,
    --force tears it down (daemon killed, directory gone)."""
    d = _container_dir(tmp_path, "c1")  # no socket: State fails
    # A stand-in daemon: "shim.containerd.main" in its command line, working in the container's directory.
    daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "shim.containerd.main"], cwd=d)
    try:
        deadline = time.monotonic() + 10
        while not runuvm._daemon_pids(d / runuvm.SOCKET):  # right after the spawn its command line can be empty
            assert time.monotonic() < deadline, "the stand-in daemon never showed up"
            time.sleep(0.01)
        rt = runuvm.Runuvm(tmp_path)
        with pytest.raises(runuvm.RunuvmError, match="its shim is alive: use delete --force"):
            asyncio.run(rt.delete("c1"))
        assert d.exists() and daemon.poll() is None
        asyncio.run(rt.delete("c1", force=True))
        assert daemon.wait(10) == -signal.SIGKILL
        assert not d.exists()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_an_exec_relay_removes_its_fifos_when_closed(tmp_path: Path) -> None:
    relay = runuvm.StdioRelay(tmp_path, "exec-1", terminal=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exec-1-stderr", "exec-1-stdin", "exec-1-stdout"]
    relay.close()
    assert list(tmp_path.iterdir()) == []
