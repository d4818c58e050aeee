"""`runuvm`, the runc-style CLI, end to end: each container in its own UVM (QEMU under TCG here),
owned by a shim daemon serving the task service under --root; and its Python client."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas import oci
from shim.containerd_env import processes_with_arg, shim_daemons
from shim.runuvm.client import ConsoleSocket, CreateOpts, RunuvmCommandError
from shim.runuvm.client import Runuvm as Client
from tests.conftest import private_config
from uvm.demo import busybox_rootfs

pytestmark = pytest.mark.vm

RUNUVM = str(Path(sys.executable).parent / "runuvm")
ID_RULE = "use 1-64 of [A-Za-z0-9_.-], starting with a letter or digit"


@pytest.fixture(scope="module")
def env(suite_dir: Path, image_dir: Path) -> Iterator[tuple[Path, Path, dict[str, str]]]:
    """(--root, a bundle whose init waits for a while, the environment runuvm runs with)."""
    base = suite_dir / "runuvm"
    root = base / "root"
    bundle = base / "bundle"
    bundle.mkdir(parents=True)
    shutil.move(busybox_rootfs(base), bundle / "rootfs")
    spec = oci.default_spec(["/bin/sh", "-c", "trap 'exit 143' TERM; while true; do sleep 0.2; done"], env=["PATH=/bin"])
    (bundle / "config.json").write_text(json.dumps(spec.wire()))
    environ = {**os.environ, "UVMSHIM_RUN_DIR": str(suite_dir / "run"), "UVMSHIM_IMAGE_DIR": str(image_dir),
               "UVMSHIM_CONFIG": str(private_config(base))}
    yield root, bundle, environ
    left = list(root.iterdir()) if root.exists() else []
    daemons = shim_daemons(under=base)  # ours only: another user's shims are not the suite's
    shutil.rmtree(base, ignore_errors=True)
    assert not left, f"left under --root: {left}"
    assert not daemons, f"shim daemons left: {daemons}"


def runuvm(env: tuple[Path, Path, dict[str, str]], *args: str, input: bytes = b"",
           log_format: str = "text") -> subprocess.CompletedProcess[bytes]:
    root, _, environ = env
    return subprocess.run([RUNUVM, "--root", str(root), "--log-format", log_format, *args], input=input,
                          capture_output=True, env=environ, timeout=300, check=False)


def state(env: tuple[Path, Path, dict[str, str]], cid: str) -> dict[str, object]:
    res = runuvm(env, "state", cid)
    assert res.returncode == 0, res.stderr
    st: dict[str, object] = json.loads(res.stdout)
    return st


def bundle_with(env: tuple[Path, Path, dict[str, str]], tmp_path: Path, args: list[str]) -> Path:
    """A bundle sharing the module's rootfs, with another init command."""
    _, bundle, _ = env
    b = tmp_path / "bundle"
    b.mkdir()
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["args"] = args
    spec["root"]["path"] = str(bundle / "rootfs")
    (b / "config.json").write_text(json.dumps(spec))
    return b


def test_lifecycle_with_state_at_each_step(env: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    _, bundle, _ = env
    pid_file = tmp_path / "pid"
    res = runuvm(env, "create", "life1", "--bundle", str(bundle), "--pid-file", str(pid_file))
    assert res.returncode == 0, res.stderr
    st = state(env, "life1")
    assert st["status"] == "created" and st["pid"] == int(pid_file.read_text()) > 0
    assert (st["id"], st["bundle"], st["rootfs"]) == ("life1", str(bundle), str(bundle / "rootfs"))
    assert runuvm(env, "start", "life1").returncode == 0
    assert state(env, "life1")["status"] == "running"
    vms = [v for v in json.loads(runuvm(env, "uvm", "list", "--format", "json").stdout) if v["task"] == "life1"]
    assert len(vms) == 1 and (vms[0]["vm"], vms[0]["state"], vms[0]["namespace"]) == ("runuvm.life1", "running", "runuvm")
    assert vms[0]["pid"] > 0 and b"runuvm.life1" in runuvm(env, "uvm", "list").stdout
    inside = runuvm(env, "uvm", "exec", "runuvm.life1", "--", "/bin/sh", "-c", "uname -r; exit 5")
    assert inside.returncode == 5 and inside.stdout.strip(), inside  # in the UVM itself, not the container
    none = runuvm(env, "uvm", "exec", "nope", "--", "true")
    assert none.returncode == 1 and b"no running UVM" in none.stderr
    again = runuvm(env, "start", "life1")
    assert again.returncode == 1 and b"already started" in again.stderr, again.stderr
    out = runuvm(env, "exec", "life1", "--", "/bin/sh", "-c", "echo from exec; exit 4")
    assert (out.returncode, out.stdout) == (4, b"from exec\n"), out.stderr
    assert not list((env[0] / "life1").glob("exec-*")), "the exec's stdio FIFOs are left behind"
    # The init's shell forks a sleep now and then: only the shell is sure to be there at any moment.
    pids = json.loads(runuvm(env, "ps", "life1", "--format", "json").stdout)
    assert pids and all(isinstance(p, int) and p > 0 for p in pids), pids
    busy = runuvm(env, "delete", "life1")
    assert busy.returncode == 1 and b"running" in busy.stderr and len(busy.stderr.splitlines()) == 1
    assert runuvm(env, "pause", "life1").returncode == 0
    assert state(env, "life1")["status"] == "paused"
    assert runuvm(env, "resume", "life1").returncode == 0
    assert runuvm(env, "kill", "life1").returncode == 0  # SIGTERM: the init's trap exits 143
    for _ in range(300):
        if state(env, "life1")["status"] == "stopped":
            break
    assert state(env, "life1")["status"] == "stopped"
    assert runuvm(env, "delete", "life1").returncode == 0
    gone = runuvm(env, "state", "life1")
    assert gone.returncode == 1 and gone.stderr == b"runuvm: container life1 does not exist\n"


def test_run_relays_output_and_exit_code(env: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    # cat ends at the end of our stdin: the relay's CloseIO (the shim holds the stdin FIFO open until then).
    b = bundle_with(env, tmp_path, ["/bin/sh", "-c", "read line; echo out $line; cat; echo err >&2; exit 3"])
    res = runuvm(env, "run", "run1", "--bundle", str(b), input=b"stdin-line\nthe rest\n")
    assert res.returncode == 3, res.stderr
    assert res.stdout == b"out stdin-line\nthe rest\n"
    assert res.stderr == b"err\n"
    assert runuvm(env, "state", "run1").returncode == 1  # run without -d deletes the container


def test_list_duplicate_and_delete_force(env: tuple[Path, Path, dict[str, str]]) -> None:
    _, bundle, _ = env
    assert runuvm(env, "run", "-d", "bg1", "--bundle", str(bundle)).returncode == 0
    table = runuvm(env, "list").stdout.decode().splitlines()
    assert table[0].split()[:3] == ["ID", "PID", "STATUS"]
    assert table[1].split()[0] == "bg1" and table[1].split()[2] == "running"
    listed = json.loads(runuvm(env, "list", "--format", "json").stdout)
    assert [(s["id"], s["status"]) for s in listed] == [("bg1", "running")]
    dup = runuvm(env, "create", "bg1", "--bundle", str(bundle))
    assert dup.returncode == 1 and dup.stderr == b"runuvm: container bg1 already exists\n"
    assert runuvm(env, "delete", "--force", "bg1").returncode == 0
    assert json.loads(runuvm(env, "list", "--format", "json").stdout) == []


@pytest.mark.parametrize("args,message", [
    (["state", "nope"], "container nope does not exist"),
    (["start", "nope"], "container nope does not exist"),
    (["kill", "nope"], "container nope does not exist"),
    (["delete", "nope"], "container nope does not exist"),
    (["create", "a/b", "--bundle", "."], f"invalid container id 'a/b': {ID_RULE}"),
    (["create", "a..b", "--bundle", "."], f"invalid container id 'a..b': {ID_RULE}"),
    (["kill", "x", "SIGNOPE"], "unknown signal 'SIGNOPE'"),
])
def test_bad_input(env: tuple[Path, Path, dict[str, str]], args: list[str], message: str) -> None:
    res = runuvm(env, *args)
    assert res.returncode == 1
    assert res.stderr.decode() == f"runuvm: {message}\n"
    as_json = runuvm(env, *args, log_format="json")
    assert json.loads(as_json.stderr)["msg"] == message


def test_bad_bundles(env: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    root, _, _ = env
    res = runuvm(env, "create", "nocfg", "--bundle", str(tmp_path))
    assert res.returncode == 1 and f"bundle {tmp_path}: no config.json".encode() in res.stderr
    (tmp_path / "config.json").write_text("{not json")
    res = runuvm(env, "create", "badjson", "--bundle", str(tmp_path))
    assert res.returncode == 1 and b"config.json is not valid JSON" in res.stderr
    (tmp_path / "config.json").write_text(json.dumps({"process": {"args": []}, "root": {"path": "rootfs"}}))
    res = runuvm(env, "create", "badspec", "--bundle", str(tmp_path))  # the shim's own validation
    assert res.returncode == 1 and b"process.args" in res.stderr, res.stderr
    assert not root.exists() or not list(root.iterdir())


def test_a_pid_file_that_cannot_be_written_fails_the_create_and_leaves_nothing(
        env: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    root, bundle, _ = env
    res = runuvm(env, "create", "pidf", "--bundle", str(bundle), "--pid-file", str(tmp_path / "no" / "such" / "p"))
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith(b"runuvm: create: ") and res.stderr.count(b"\n") == 1, res.stderr
    assert not list(root.iterdir())
    assert runuvm(env, "state", "pidf").returncode == 1


def read_until(fd: int, marker: bytes, seen: bytearray, timeout: float = 120) -> None:
    """Read the terminal master fd into seen until marker shows up."""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        assert time.monotonic() < deadline, f"no {marker!r} in {bytes(seen[-2000:])!r}"
        if select.select([fd], [], [], 1)[0]:
            seen += os.read(fd, 65536)


def test_create_with_console_socket_and_log_files(env: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    """runc's --console-socket (the terminal's master, sent over the socket) and runhcs's --shim-log,
    --vm-log and --vm-console, through the Python client's CreateOpts and ConsoleSocket."""
    root, _, environ = env
    b = bundle_with(env, tmp_path, ["/bin/sh", "-c", "tty; stty size; read x; echo got $x; exit 3"])
    spec = json.loads((b / "config.json").read_text())
    spec["process"]["terminal"] = True
    (b / "config.json").write_text(json.dumps(spec))
    logs = tmp_path / "logs"
    logs.mkdir()
    rt = Client(root=root, command=[RUNUVM])
    with ConsoleSocket() as sock:
        opts = CreateOpts(shim_log=logs / "shim.log", vm_log=logs / "vm.log", vm_console=logs / "console.log",
                          console_socket=sock.path)
        create = subprocess.Popen([RUNUVM, "--root", str(root), "create", "tty1", "--bundle", str(b), *opts.args()],
                                  env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            master = sock.receive_master(timeout=300)
        finally:
            _, err = create.communicate(timeout=300)
    assert create.returncode == 0, err
    seen = bytearray()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k in ("UVMSHIM_RUN_DIR", "UVMSHIM_IMAGE_DIR"):
                mp.setenv(k, environ[k])
            rt.resize_tty("tty1", 101, 33)
            rt.start("tty1")
            read_until(master, b"33 101", seen)
            assert re.search(rb"/dev/pts/\d+", seen), seen
            os.write(master, b"hello\r")  # the terminal in the UVM echoes it and ends the line
            read_until(master, b"got hello", seen)
            for _ in range(300):
                if rt.state("tty1").status == "stopped":
                    break
                time.sleep(0.1)
            assert rt.state("tty1").status == "stopped"
            rt.delete("tty1")
    finally:
        os.close(master)
        runuvm(env, "delete", "--force", "tty1")
    assert b"hello\r\n" in seen, seen  # one echo, by the guest's terminal: the host pty is raw
    shim_log = (logs / "shim.log").read_text()
    assert "serving task runuvm/tty1" in shim_log and "shim for task runuvm/tty1 exits" in shim_log
    vm_log = (logs / "vm.log").read_text()
    assert "uvm.runuvm.tty1: started in" in vm_log and "uvmshim.task" not in vm_log
    assert "uvm-agent" in (logs / "console.log").read_text()


@pytest.mark.parametrize("case", ["tty-no-socket", "socket-no-tty", "no-such-socket", "bad-log"])
def test_bad_create_options(env: tuple[Path, Path, dict[str, str]], tmp_path: Path, case: str) -> None:
    root, _, _ = env
    b = bundle_with(env, tmp_path, ["/bin/true"])
    spec = json.loads((b / "config.json").read_text())
    spec["process"]["terminal"] = case != "socket-no-tty"
    (b / "config.json").write_text(json.dumps(spec))
    args, message = {
        "tty-no-socket": ([], "the process has a terminal (process.terminal in config.json, or -t) and runs detached: "
                              "give --console-socket"),
        "socket-no-tty": (["--console-socket", str(tmp_path / "s")], "--console-socket: the process has no terminal"),
        "no-such-socket": (["--console-socket", str(tmp_path / "s")],
                           f"--console-socket {tmp_path / 's'}: No such file or directory"),
        "bad-log": (["--console-socket", str(tmp_path / "s"), "--vm-log", str(tmp_path / "no" / "vm.log")],
                    f"--vm-log {tmp_path / 'no' / 'vm.log'}: No such file or directory"),
    }[case]
    if case == "bad-log":  # a socket that is there: the log is what fails
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(tmp_path / "s"))
        listener.listen(1)
    res = runuvm(env, "create", "opt1", "--bundle", str(b), *args)
    assert res.returncode == 1 and res.stderr.decode().startswith(f"runuvm: {message}"), res.stderr
    assert res.stderr.count(b"\n") == 1
    assert not root.exists() or not list(root.iterdir())
    assert runuvm(env, "state", "opt1").returncode == 1
    assert not processes_with_arg("opt1")


def test_python_client(env: tuple[Path, Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root, bundle, environ = env
    for k in ("UVMSHIM_RUN_DIR", "UVMSHIM_IMAGE_DIR"):
        monkeypatch.setenv(k, environ[k])
    rt = Client(root=root, command=[RUNUVM])
    rt.create("cli1", bundle)
    assert rt.state("cli1").status == "created"
    rt.start("cli1")
    assert [s.id for s in rt.list()] == ["cli1"]
    assert rt.exec("cli1", ["/bin/echo", "hi"]) == b"hi\n"
    assert rt.exec("cli1", ["/bin/sleep", "1"], detach=True, pid_file=tmp_path / "exec.pid") == b""
    assert int((tmp_path / "exec.pid").read_text()) > 1
    with ConsoleSocket() as sock, concurrent.futures.ThreadPoolExecutor(1) as pool:
        master_fd = pool.submit(sock.receive_master, 120)
        rt.exec("cli1", ["/bin/sh", "-c", "echo on a $(tty | cut -c1-8); sleep 2"], detach=True, tty=True,
                console_socket=sock.path)
        master = master_fd.result(120)
    try:
        read_until(master, b"on a /dev/pts", bytearray())
    finally:
        os.close(master)
    assert len(rt.ps("cli1")) >= 1
    rt.pause("cli1")
    assert rt.state("cli1").status == "paused"
    rt.resume("cli1")
    with pytest.raises(RunuvmCommandError) as e:
        rt.delete("cli1")
    assert e.value.status == 1 and "running" in e.value.message
    rt.kill("cli1", "SIGKILL")
    rt.delete("cli1", force=True)
    with pytest.raises(RunuvmCommandError, match="does not exist"):
        rt.state("cli1")


def test_boot_exec_share_and_scsi(env: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    """The debug VM: a host directory over 9p, a scratch disk on virtio-scsi, a command's output and code."""
    _, _, environ = env
    (tmp_path / "hello").write_text("from the host\n")
    scratch = tmp_path / "scratch.img"
    assert subprocess.run([RUNUVM, "create-scratch", str(scratch), "--size-gb", "1"], env=environ,
                          capture_output=True, check=False).returncode == 0
    boot_root = tmp_path / "boot-root"  # not the default --root: nothing of the test outside its directories
    res = subprocess.run([RUNUVM, "--root", str(boot_root), "boot", "--measure", "--share", f"{tmp_path}:/mnt/host",
                          "--mount-scsi", str(scratch),
                          "--exec", "sh -c 'uname -r; cat /mnt/host/hello; ls /mnt/scsi0; exit 6'"],
                         env=environ, capture_output=True, timeout=300, check=False)
    assert res.returncode == 6, res.stderr
    lines = res.stdout.decode().splitlines()
    assert re.fullmatch(r"\d+\.\d+\.\d+-\S+", lines[0]) and lines[1:] == ["from the host", "lost+found"], lines
    assert re.search(rb"boot: \d+\.\d+s to agent ready", res.stderr)
    assert re.search(rb"\n  host: qemu up \d+\.\d+s, then the agent's hello after \d+\.\d+s\n", res.stderr), res.stderr
    assert re.search(rb"\n  guest \(by its uptime\): kernel \d+\.\d\ds, /init \d+\.\d\ds, python3 and the agent's "
                     rb"import \d+\.\d\ds, agent to hello \d+\.\d\ds; before its clock started .* -?\d+\.\d\ds\n", res.stderr), \
        res.stderr
    assert b"-> /mnt/scsi0 (/dev/sd" in res.stderr


def test_boot_bad_options(env: tuple[Path, Path, dict[str, str]], tmp_path: Path) -> None:
    _, _, environ = env
    for args, message in ((["--share", "/nonexistent:/x"], b"/nonexistent is not a directory"),
                          (["--share", "nocolon"], b"expected HOST_DIR:/GUEST/PATH"),
                          (["--memory", "0"], b"memory_mib"), (["--count", "0"], b"at least 1")):
        res = subprocess.run([RUNUVM, "--root", str(tmp_path), "boot", *args], env=environ, capture_output=True,
                             timeout=60, check=False)
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)
