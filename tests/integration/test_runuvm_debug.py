"""`runuvm`'s ways into a VM, end to end under TCG: `boot --ssh` with `runuvm ssh` and paramiko,
`boot --console` driven through piped stdin, and `resize-tty --pid` of an exec'd process."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas import oci
from shim.containerd_env import shim_daemons
from shim.runuvm.client import ConsoleSocket
from tests.conftest import _qemu_processes_under, private_config
from uvm.demo import busybox_rootfs
from uvm.ssh import connect

pytestmark = pytest.mark.vm

RUNUVM = str(Path(sys.executable).parent / "runuvm")

Env = tuple[Path, Path, dict[str, str]]  # (--root, run dir, environment)


@pytest.fixture(scope="module")
def env(suite_dir: Path, image_dir: Path) -> Iterator[Env]:
    base = suite_dir / "runuvm-debug"
    root = base / "root"
    base.mkdir()
    environ = {**os.environ, "UVMSHIM_RUN_DIR": str(suite_dir / "run"), "UVMSHIM_IMAGE_DIR": str(image_dir),
               "UVMSHIM_CONFIG": str(private_config(base)),
               "UVMSHIM_STATE_DIR": str(suite_dir / "state")}
    yield root, suite_dir / "run", environ
    left = [p for p in root.rglob("*") if p.name != ".boot"] if root.exists() else []
    daemons = shim_daemons(under=base)  # ours only
    shutil.rmtree(base, ignore_errors=True)
    assert not left, f"left under --root: {left}"
    assert not daemons, f"shim daemons left: {daemons}"


def stop(proc: subprocess.Popen[bytes]) -> None:
    """A runuvm still running after a failed check: SIGTERM (it cleans up), SIGKILL if that hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def runuvm(env: Env, *args: str, input: bytes = b"", timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    root, _, environ = env
    return subprocess.run([RUNUVM, "--root", str(root), *args], input=input, capture_output=True, env=environ,
                          timeout=timeout, check=False)


def assert_vm_gone(env: Env, vm_id: str) -> None:
    root, run, _ = env
    assert not (root / ".boot" / vm_id).exists(), "the boot's claim (and SSH access, private key) was left behind"
    assert not (run / vm_id).exists(), f"run directory left: {list((run / vm_id).iterdir())}"
    assert not [p for p in _qemu_processes_under(run) if vm_id in p], "QEMU left running"


def boot_with_ssh(env: Env) -> tuple[subprocess.Popen[bytes], str, int, Path]:
    """`runuvm boot --ssh`, once it says the VM serves: (its process, VM id, port, private key)."""
    root, _, environ = env
    boot = subprocess.Popen([RUNUVM, "--root", str(root), "boot", "--ssh"], env=environ, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert boot.stderr is not None
    said = b""
    deadline = time.monotonic() + 240
    while b"runs until Ctrl-C" not in said:
        line = boot.stderr.readline()
        if not line or time.monotonic() > deadline:
            stop(boot)
            pytest.fail(f"boot --ssh ended early: {said!r}")
        said += line
    m = re.search(rb"VM (\S+): SSH on 127\.0\.0\.1:(\d+) as root, key (\S+)\n", said)
    assert m, said
    return boot, m.group(1).decode(), int(m.group(2)), Path(m.group(3).decode())


def on_a_terminal(env: Env, args: list[str], ready: bytes, keys: bytes, size: tuple[int, int]) -> tuple[bytes, int]:
    """runuvm ARGS on a new pty of size (rows, cols): once ready shows, type keys; (output, exit code)."""
    import fcntl
    import pty
    import select
    import termios

    root, _, environ = env
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
    proc = subprocess.Popen([RUNUVM, "--root", str(root), *args], env=environ, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        typed = False
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                with contextlib.suppress(OSError):
                    seen += os.read(master, 65536)
            if not typed and ready in seen:
                os.write(master, keys)
                typed = True
        return seen, proc.wait(timeout=10)
    finally:
        stop(proc)
        os.close(master)
        os.close(slave)


def test_boot_ssh_then_commands_over_paramiko_and_runuvm_ssh(env: Env) -> None:
    root, _, _ = env
    boot, vm_id, port, key = boot_with_ssh(env)
    try:
        assert key == root / ".boot" / vm_id / "id_ed25519"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
        record = json.loads((key.parent / "ssh.json").read_text())
        assert (record["vm"], record["port"], record["key"]) == (vm_id, port, str(key))
        assert json.loads((key.parent / "owner.json").read_text())["pid"] == boot.pid
        assert f"[127.0.0.1]:{port} {record['host_key']}" in (key.parent / "known_hosts").read_text()

        # paramiko, the host key pinned to the one the guest reported
        client = connect(port, key, record["host_key"])
        try:
            _, out, err = client.exec_command("uname -r; echo to-stderr >&2; ip -4 addr show eth0; exit 3")
            assert out.channel.recv_exit_status() == 3
            lines = out.read().decode()
            assert re.match(r"\d+\.\d+\.\d+-\S+\n", lines) and "inet 10.0.2.15/24" in lines, lines
            assert err.read() == b"to-stderr\n"
            # restrict=on: the guest cannot reach the host, even the port forwarded to it
            _, out, err = client.exec_command(f"nc -w 3 10.0.2.2 {port} </dev/null")
            assert out.channel.recv_exit_status() == 1 and b"Connection refused" in err.read()
        finally:
            client.close()

        # runuvm ssh: output, exit status, stdin
        res = runuvm(env, "ssh", vm_id, "echo", "hello from", "$((40 + 2));", "exit", "4")
        assert (res.returncode, res.stdout, res.stderr) == (4, b"hello from 42\n", b""), res
        res = runuvm(env, "ssh", vm_id, "--", "wc", "-c", input=b"12345")
        assert (res.returncode, res.stdout.strip()) == (0, b"5"), res
        # runuvm ssh without a command: a shell on a pty sized like our terminal
        seen, code = on_a_terminal(env, ["ssh", vm_id], b"# ", b"stty size; exit 5\r", (40, 120))
        assert code == 5 and b"\r\n40 120\r\n" in seen, seen
    finally:
        boot.send_signal(signal.SIGTERM)
        code = boot.wait(timeout=120)
    assert code == 0, boot.stderr.read() if boot.stderr else b""
    assert_vm_gone(env, vm_id)
    gone = runuvm(env, "ssh", vm_id, "true")
    assert gone.returncode == 1 and gone.stderr.startswith(f"runuvm: ssh {vm_id}: no VM with that id".encode())


@pytest.mark.parametrize("how", ["ctrl-c", "ctrl-c twice", "kill"])
def test_boot_ssh_leaves_nothing_when_interrupted_or_killed(env: Env, how: str) -> None:
    """Ctrl-C stops the VM and removes the key at once (a second Ctrl-C during the graceful stop forces
    the VM off, and the teardown still completes); after SIGKILL (QEMU dies with its parent) the next
    `runuvm ssh` finds the VM gone and removes what was left."""
    boot, vm_id, _, key = boot_with_ssh(env)
    assert key.exists()
    if how.startswith("ctrl-c"):
        boot.send_signal(signal.SIGINT)
        if how == "ctrl-c twice":
            time.sleep(0.05)
            boot.send_signal(signal.SIGINT)
        assert boot.wait(timeout=120) == 0
        if how == "ctrl-c twice":
            assert boot.stderr is not None and b"stopping the UVMs now" in boot.stderr.read()
    else:
        boot.kill()
        boot.wait()
        gone = runuvm(env, "ssh", vm_id, "true")
        assert (gone.returncode, gone.stderr) == (
            1, f"runuvm: ssh {vm_id}: that VM is gone (its `runuvm boot` process was killed)\n".encode())
    assert_vm_gone(env, vm_id)


def test_a_plain_boot_killed_outright_is_swept_by_the_next_boot(env: Env) -> None:
    """SIGKILL leaves the run directory (QEMU dies with its parent, nothing else runs): the next
    `runuvm boot` removes it, through the claim the killed one made before starting its VM."""
    root, run, environ = env
    boot = subprocess.Popen([RUNUVM, "--root", str(root), "boot", "--measure", "--exec", "sleep 600"], env=environ,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert boot.stderr is not None
        line = boot.stderr.readline()
        m = re.match(rb"boot: [0-9.]+s to agent ready \((\S+), ", line)
        assert m, line
        vm_id = m.group(1).decode()
        boot.kill()
        boot.wait()
    finally:
        stop(boot)
    assert (run / vm_id).exists() and (root / ".boot" / vm_id).exists()
    res = runuvm(env, "boot", "--exec", "true")
    assert res.returncode == 0, res.stderr
    assert_vm_gone(env, vm_id)


def test_ssh_with_a_bad_vm_id(env: Env) -> None:
    res = runuvm(env, "ssh", "uvm-nosuch", "true", timeout=60)
    assert res.returncode == 1 and res.stdout == b""
    assert res.stderr.decode().startswith("runuvm: ssh uvm-nosuch: no VM with that id was booted with "
                                          "`runuvm boot --ssh`") and res.stderr.count(b"\n") == 1, res.stderr
    res = runuvm(env, "ssh", "../etc", "true", timeout=60)
    assert (res.returncode, res.stderr) == (1, b"runuvm: ssh: '../etc' is not a VM id\n")


def test_boot_console_with_piped_stdin(env: Env) -> None:
    res = runuvm(env, "boot", "--console", input=b"echo console-$((6*7)); tty\nexit 7\n")
    assert res.returncode == 7, res.stderr
    out = res.stdout.decode().replace("\r", "")
    assert "\nconsole-42\n/dev/ttyS0\n" in out, out
    m = re.search(r"console of VM (\S+): Ctrl-\] detaches", res.stderr.decode())
    assert m, res.stderr
    assert_vm_gone(env, m.group(1))
    # Ctrl-] detaches at once (what follows it is not sent); the VM is stopped all the same
    res = runuvm(env, "boot", "--console", input=b"echo one\n\x1decho two\n")
    assert res.returncode == 0, res.stderr
    assert b"two" not in res.stdout
    m = re.search(r"console of VM (\S+):", res.stderr.decode())
    assert m, res.stderr
    assert_vm_gone(env, m.group(1))


def test_boot_refuses_what_it_cannot_do(env: Env) -> None:
    root, run, _ = env
    for extra in (["--count", "2"], ["--exec", "true"]):
        res = runuvm(env, "boot", "--console", *extra, timeout=60)
        assert res.returncode == 2 and b"--console attaches one UVM's console" in res.stderr, res.stderr
    for cmd, problem in (("echo 'unclosed", b"No closing quotation"), ("  ", b"no command")):
        res = runuvm(env, "boot", "--exec", cmd, timeout=60)  # found before anything boots
        assert res.returncode == 2 and res.stderr.startswith(b"runuvm boot: --exec") and problem in res.stderr, res
    res = runuvm(env, "boot", "--ssh", "--backend", "libvirt", timeout=120)
    assert res.returncode == 1 and res.stderr.endswith(
        b"ssh_port (user-network port forwarding): only the qemu backend supports it, not libvirt\n"), res.stderr
    assert not list(run.iterdir()) and not list((root / ".boot").glob("*"))


def test_resize_tty_of_an_exec_by_pid(env: Env, tmp_path: Path) -> None:
    root, _, _ = env
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.move(busybox_rootfs(tmp_path), bundle / "rootfs")
    spec = oci.default_spec(["/bin/sh", "-c", "trap 'exit 143' TERM; while true; do sleep 0.2; done"], env=["PATH=/bin"])
    (bundle / "config.json").write_text(json.dumps(spec.wire()))
    pid_file = tmp_path / "exec.pid"
    try:
        assert runuvm(env, "run", "-d", "rz1", "--bundle", str(bundle)).returncode == 0
        watcher = "while true; do stty size > /tmp/size.new && mv /tmp/size.new /tmp/size; sleep 0.1; done"
        no_socket = runuvm(env, "exec", "-d", "-t", "rz1", "--", "/bin/sh", "-c", watcher)
        assert no_socket.returncode == 1 and b"give --console-socket" in no_socket.stderr, no_socket.stderr
        with ConsoleSocket() as sock:  # as runc's exec -d -t: the terminal's master comes over the socket
            execing = subprocess.Popen([RUNUVM, "--root", str(root), "exec", "-d", "-t", "--console-socket", str(sock.path),
                                        "--pid-file", str(pid_file), "rz1", "--", "/bin/sh", "-c", watcher],
                                       env=env[2], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                master = sock.receive_master(timeout=120)
            finally:
                _, err = execing.communicate(timeout=120)
        os.close(master)  # the process keeps its terminal: the shim holds the slave
        assert execing.returncode == 0, err
        pid = int(pid_file.read_text())
        res = runuvm(env, "resize-tty", "rz1", "123", "45", "--pid", str(pid))
        assert res.returncode == 0, res.stderr
        size = b""
        for _ in range(100):
            size = runuvm(env, "exec", "rz1", "--", "/bin/cat", "/tmp/size").stdout.strip()
            if size == b"45 123":
                break
            time.sleep(0.2)
        assert size == b"45 123"
        init = json.loads(runuvm(env, "state", "rz1").stdout)["pid"]
        bad = runuvm(env, "resize-tty", "rz1", "80", "24", "--pid", "999999")
        assert (bad.returncode, bad.stderr) == (
            1, b"runuvm: container rz1: resize-tty --pid 999999: no such process in the container\n")
        assert init != pid
    finally:
        assert runuvm(env, "delete", "--force", "rz1").returncode == 0
    assert not (root / "rz1").exists()


def test_boot_console_on_a_terminal(env: Env) -> None:
    """On a terminal: raw mode while attached (restored after), the console sized like the terminal,
    Ctrl-C to the guest's foreground job, Ctrl-] to detach."""
    import fcntl
    import pty
    import select
    import termios

    root, _, environ = env
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    before = termios.tcgetattr(slave)
    boot = subprocess.Popen([RUNUVM, "--root", str(root), "boot", "--console"], env={**environ, "TERM": "xterm"},
                            stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    seen = b""
    start = 0  # read_until looks for its marker in what came after this offset

    def read_until(marker: bytes, timeout: float = 120) -> None:
        nonlocal seen, start
        deadline = time.monotonic() + timeout
        while marker not in seen[start:]:
            assert time.monotonic() < deadline, f"no {marker!r} in {seen[-2000:]!r}"
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 65536)
        start = seen.index(marker, start) + len(marker)

    try:
        read_until(b":~# ")
        # The child says when it runs: by then it is the terminal's foreground job (ash's job control)
        os.write(master, b"stty size; sh -c 'echo sleep-$((1+1)); exec sleep 100'\r")
        read_until(b"33 101")
        read_until(b"sleep-2")
        os.write(master, b"\x03")  # raw mode: Ctrl-C goes to the guest and interrupts its sleep
        read_until(b":~# ", timeout=60)
        os.write(master, b"echo after-$((1+1))\r")
        read_until(b"after-2")
        os.write(master, b"\x1d")
        assert boot.wait(timeout=120) == 0
        assert termios.tcgetattr(slave) == before, "the terminal was left in raw mode"
    finally:
        stop(boot)
        os.close(master)
        os.close(slave)
    m = re.search(rb"console of VM (\S+):", seen)
    assert m, seen
    assert_vm_gone(env, m.group(1).decode())
