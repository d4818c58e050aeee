"""shim.containerd.main: Go-style flag parsing, exit codes and usage, the socket path, the runtime options on stdin,
and the `start`/`delete` actions run as containerd runs them (a subprocess in the bundle directory)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from schemas.containerd import runtimeoptions_pb2, shim_pb2
from shim.containerd.main import SOCKET_DIR, USAGE, Flags, UsageError, _runtime_config_path, main, parse_flags, socket_path

PYTHON = Path(sys.executable)
REPO = Path(__file__).resolve().parents[2]


def runtime_options(config_path: str, type_url: str = "runtimeoptions.v1.Options") -> bytes:
    """What containerd writes on the shim's stdin for `ctr run --runtime-config-path P`."""
    value = runtimeoptions_pb2.Options(config_path=config_path).SerializeToString()
    return any_pb2.Any(type_url=type_url, value=value).SerializeToString()


# -- parse_flags ---------------------------------------------------------------------------------------


def test_parse_flags_as_containerd_sends_them() -> None:
    flags = parse_flags(["-namespace", "default", "-address", "/run/containerd/containerd.sock",
                         "-publish-binary", "/usr/bin/containerd", "-id", "t1", "-debug", "start"])
    assert flags == Flags(namespace="default", address="/run/containerd/containerd.sock",
                          publish_binary="/usr/bin/containerd", id="t1", debug=True, action="start")


def test_parse_flags_runuvm_gives_its_daemon_log_and_console_files() -> None:
    flags = parse_flags(["-id", "c1", "-log", "/l/shim.log", "-vm-log=/l/vm.log", "--vm-console", "/l/console.log",
                         "serve"])
    assert (flags.log, flags.vm_log, flags.vm_console, flags.action) == (
        "/l/shim.log", "/l/vm.log", "/l/console.log", "serve")


def test_parse_flags_equals_and_double_dash_forms() -> None:
    flags = parse_flags(["-id=x", "--namespace=ns", "--bundle", "/b", "--debug", "delete"])
    assert (flags.id, flags.namespace, flags.bundle, flags.debug, flags.action) == ("x", "ns", "/b", True, "delete")


def test_parse_flags_empty_value_after_equals() -> None:
    assert parse_flags(["-id=", "delete"]).id == ""


def test_parse_flags_value_flag_takes_next_argument_even_if_it_looks_like_a_flag() -> None:
    # Go: a non-boolean flag always consumes the next argument.
    assert parse_flags(["-id", "-odd", "delete"]).id == "-odd"


@pytest.mark.parametrize(("arg", "expected"), [
    ("-debug", True), ("-debug=true", True), ("-debug=1", True), ("-debug=TRUE", True),
    ("-debug=false", False), ("-debug=0", False), ("-debug=False", False), ("--debug=false", False),
])
def test_parse_flags_boolean_values(arg: str, expected: bool) -> None:
    assert parse_flags([arg, "start"]).debug is expected


@pytest.mark.parametrize("value", ["f", "F"])
def test_parse_flags_boolean_go_short_false(value: str) -> None:
    assert parse_flags([f"-debug={value}", "start"]).debug is False


def test_parse_flags_double_dash_ends_flags() -> None:
    assert parse_flags(["-id", "x", "--", "start"]).action == "start"


def test_parse_flags_version_needs_no_action() -> None:
    flags = parse_flags(["-v"])
    assert flags.version is True
    assert flags.action == ""


@pytest.mark.parametrize(("argv", "message"), [
    (["-bogus", "start"], "unknown flag -bogus"),
    (["--bogus=1", "start"], "unknown flag -bogus"),
    (["-id"], "flag -id needs a value"),
    (["-namespace", "ns", "-id"], "flag -id needs a value"),
    (["-id", "x"], "missing action"),
    ([], "missing action"),
    (["-id", "x", "start", "delete"], "expected one action"),
    (["start", "-id", "x"], "expected one action"),  # Go stops at the first non-flag: flags must come first
    (["-id", "x", "--"], "expected one action"),
])
def test_parse_flags_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_flags(argv)


# -- main ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["-h"], ["--help"], ["help"], []])
def test_main_help_prints_usage_and_exits_0(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out == USAGE
    assert err == ""


def test_main_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-v"]) == 0
    assert "containerd-shim-uvm-v1" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["-bogus", "start"], "unknown flag -bogus"),
    (["-namespace", "ns", "-id"], "flag -id needs a value"),
    (["-namespace", "ns", "-id", "t"], "missing action"),
    (["-namespace", "ns", "-id", "t", "start", "extra"], "expected one action"),
    (["-namespace", "ns", "-id", "t", "frobnicate"], "unknown action 'frobnicate'"),
    (["-id", "t", "delete"], "-namespace and -id are required"),
    (["-namespace", "ns", "start"], "-namespace and -id are required"),
    (["-namespace", "ns", "-id", "t", "serve"], "-socket-fd"),
])
def test_main_bad_input_exits_2_with_usage_on_stderr(argv: list[str], message: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""  # for `start`, stdout is the address containerd reads: nothing may leak there
    assert err.startswith("containerd-shim-uvm-v1: ")
    assert message in err
    assert USAGE in err


def test_main_start_with_undecodable_runtime_options_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xff\xff")))
    assert main(["-namespace", "ns", "-id", f"t-{uuid.uuid4().hex[:8]}", "-address", "/tmp/x.sock", "start"]) == 2
    assert "do not decode" in capsys.readouterr().err
    assert not (tmp_path / "address").exists()


def test_main_start_with_bad_config_from_runtime_options_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "uvmshim.toml"
    config.write_text("[uvm]\ncpus = 0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("UVMSHIM_CONFIG", raising=False)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(runtime_options(str(config)))))
    flags = ["-namespace", "ns", "-id", f"t-{uuid.uuid4().hex[:8]}", "-address", "/tmp/x.sock"]
    assert main([*flags, "start"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert str(config) in err
    assert "uvm.cpus" in err
    assert not (tmp_path / "address").exists()
    assert not socket_path(parse_flags([*flags, "start"])).exists()


# -- socket_path ---------------------------------------------------------------------------------------


def test_socket_path_is_short_deterministic_and_under_the_socket_dir() -> None:
    flags = Flags(namespace="n" * 76, address="/run/containerd/" + "a" * 200 + ".sock", id="i" * 76)
    path = socket_path(flags)
    assert path.parent == SOCKET_DIR == Path("/run/containerd/s")
    assert len(str(path)) < 108
    assert socket_path(Flags(namespace=flags.namespace, address=flags.address, id=flags.id)) == path


def test_socket_path_unique_per_address_namespace_and_id() -> None:
    address = "/run/containerd/containerd.sock"
    variants = [Flags(address=address, namespace="default", id="t1"),
                Flags(address="/run/other.sock", namespace="default", id="t1"),
                Flags(address=address, namespace="k8s.io", id="t1"),
                Flags(address=address, namespace="default", id="t2")]
    paths = {socket_path(v) for v in variants}
    assert len(paths) == len(variants)


def test_socket_path_ignores_other_flags() -> None:
    a = Flags(namespace="ns", address="/a.sock", id="t")
    b = Flags(namespace="ns", address="/a.sock", id="t", bundle="/b", debug=True, action="delete")
    assert socket_path(a) == socket_path(b)


def test_socket_path_namespace_and_id_boundaries_do_not_collide() -> None:
    assert socket_path(Flags(address="/a.sock", namespace="ab", id="c")) != \
        socket_path(Flags(address="/a.sock", namespace="a", id="bc"))


# -- _runtime_config_path ------------------------------------------------------------------------------


def test_runtime_config_path_empty_stdin() -> None:
    assert _runtime_config_path(b"") is None


def test_runtime_config_path_from_runtime_options() -> None:
    assert _runtime_config_path(runtime_options("/x")) == "/x"


def test_runtime_config_path_empty_config_path_is_none() -> None:
    assert _runtime_config_path(runtime_options("")) is None


def test_runtime_config_path_other_type_url_is_none() -> None:
    assert _runtime_config_path(runtime_options("/x", type_url="io.containerd.runc.v1.Options")) is None


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff", b"garbage", b"\x0a\x05ab"])
def test_runtime_config_path_garbage_is_a_usage_error(garbage: bytes) -> None:
    with pytest.raises(UsageError, match="do not decode"):
        _runtime_config_path(garbage)


def test_runtime_config_path_undecodable_options_value_is_a_usage_error() -> None:
    data = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=b"\xff\xff").SerializeToString()
    with pytest.raises(UsageError):
        _runtime_config_path(data)


# -- the actions, as containerd runs them -----------------------------------------------------------------


def run_shim(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    environ = {k: v for k, v in os.environ.items() if k != "UVMSHIM_CONFIG"}
    environ["PYTHONPATH"] = str(REPO)
    environ.update(env or {})
    return subprocess.run([str(PYTHON), "-m", "shim.containerd.main", *args], cwd=cwd, env=environ, stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=30, check=False)


def test_delete_action_reports_a_kill_and_is_idempotent(tmp_path: Path) -> None:
    args = ["-namespace", "ns", "-id", "t", "-address", "/tmp/x.sock", "-bundle", str(tmp_path), "delete"]
    for _ in range(2):
        res = run_shim(args, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        resp = shim_pb2.DeleteResponse.FromString(res.stdout)
        assert resp.exit_status == 128 + signal.SIGKILL == 137
        assert resp.exited_at.seconds > 0
        assert res.stderr == b""


def test_delete_action_kills_what_a_dead_shim_left(tmp_path: Path) -> None:
    """A state file naming a run directory, a process using it: delete kills it and removes the directory."""
    from shim.containerd import leftovers

    run_dir = Path(os.path.realpath(tmp_path / "run"))
    run_dir.mkdir()
    (run_dir / "qmp.sock").touch()
    leaked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(100)", f"{run_dir}/qemu.log"])
    try:
        deadline = time.monotonic() + 5.0
        while not Path(f"/proc/{leaked.pid}/cmdline").read_bytes():  # empty until exec completed
            assert time.monotonic() < deadline
            time.sleep(0.005)
        leftovers.record(tmp_path, {"vm_id": run_dir.name, "run_dir": str(run_dir)})
        args = ["-namespace", "ns", "-id", "t", "-address", "/tmp/x.sock", "-bundle", str(tmp_path), "delete"]
        res = run_shim(args, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert leaked.wait(timeout=5) == -signal.SIGKILL
        assert f"killed VM processes [{leaked.pid}]".encode() in res.stderr
        assert not run_dir.exists()
        assert not (tmp_path / leftovers.STATE_FILE).exists()
        assert shim_pb2.DeleteResponse.FromString(res.stdout).exit_status == 137
        again = run_shim(args, cwd=tmp_path)
        assert again.returncode == 0
        assert again.stderr == b""
    finally:
        if leaked.poll() is None:
            leaked.kill()
            leaked.wait()


def _serving_shims(task_id: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if task_id.encode() in argv and b"serve" in argv:
            found.append(int(pid))
    return found


def test_start_action_with_a_bad_config_fails_before_spawning(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('log_level = "info"\nfrobnicate = 1\n')
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    task_id = f"t-{uuid.uuid4().hex[:8]}"
    args = ["-namespace", "ns", "-id", task_id, "-address", "/tmp/x.sock", "-publish-binary", "/usr/bin/containerd"]
    res = run_shim([*args, "start"], cwd=bundle, env={"UVMSHIM_CONFIG": str(config)})
    assert res.returncode == 1
    assert res.stdout == b""
    assert b"frobnicate" in res.stderr
    assert str(config).encode() in res.stderr
    assert not (bundle / "address").exists()
    assert not socket_path(parse_flags([*args, "start"])).exists()
    assert _serving_shims(task_id) == []


def test_the_task_service_socket_is_roots_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """0600, as containerd's runc shim makes its own since CVE-2020-15257 (anyone who can connect to a shim's
    socket can run anything in its containers)."""
    import subprocess

    from shim.containerd import main as shim_main

    spawned: list[list[str]] = []

    class NoDaemon:
        def __init__(self, argv: list[str], **kw: object) -> None:
            spawned.append(argv)
            self.pid = 4242

    monkeypatch.setattr(subprocess, "Popen", NoDaemon)
    sock = tmp_path / "s.sock"
    shim_main.spawn_server(sock, shim_main.Flags(namespace="ns", id="t1"), None)
    assert spawned and sock.stat().st_mode & 0o777 == 0o600
