"""runuvm's command line: exec's options before or after the id, as runc takes them; the Python
client's argv (no VM: the parsing only)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from shim import cli
from shim.runuvm_client import Runuvm


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
