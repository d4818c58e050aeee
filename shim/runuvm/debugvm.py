"""`runuvm boot`'s ways into a debug VM: SSH (`--ssh`, `runuvm ssh`) and the serial console (`--console`).

Claim. Every `runuvm boot` VM, before it starts, gets --root/.boot/<vm id>/ (mode 0700), which
appears whole (renamed into place): ``owner.json`` (the boot process, with its start time so a
reused pid is not it) and ``uvmshim.json`` (the VM's run directory and backend, as shim.containerd.leftovers
records a shim's). It goes when the VM stops, on every path the boot process controls (the end of
--exec, Ctrl-C, SIGTERM, a failure); when the boot process was killed outright, even mid-start, the
next `runuvm boot` or `runuvm ssh` removes it, and with shim.containerd.leftovers what the VM left (a QEMU
still running, its run directory, a libvirt domain). `.boot` cannot clash with a container's
directory: ids start with a letter or digit.

SSH. `boot --ssh` gives the VM a NIC on QEMU's restricted user network with a free 127.0.0.1 port
forwarded to the guest's port 22 (UvmConfig.ssh_port), starts the guest's dropbear with a key pair
made for this VM (uvm/ssh.py), then publishes how to reach it in the claim: ``id_ed25519`` (0600),
``known_hosts`` (for OpenSSH's ssh) and, last, ``ssh.json`` (VM id, port, key path, the pinned host
key). `runuvm ssh VMID [CMD...]` reads the record and runs CMD (or a shell) over paramiko; it is
synchronous, as paramiko is.

Console. `boot --console` puts the serial console on a unix socket (UvmConfig.console_socket; QEMU
still writes the console log), starts a shell on ttyS0 through the agent (busybox cttyhack makes
ttyS0 its controlling terminal, so Ctrl-C reaches the guest's foreground job) and relays the
caller's terminal in raw mode, or piped stdin. Ctrl-] detaches; the shell ending (`exit`, or the
end of piped input, sent as Ctrl-D) ends the relay too. Either way `runuvm boot` then stops the VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import sys
import termios
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas import oci
from schemas.uvm_config import ID_RE
from shim.containerd import leftovers
from shim.containerd.stdio import write_all
from shim.runuvm.commands import RunuvmError, read_input
from uvm.backends.qemu import CONSOLE_SOCKET
from uvm.errors import UvmError
from uvm.ssh import ClientKey, SshError, connect, enable_ssh, known_hosts_line, run_command
from uvm.vm import UtilityVM

if TYPE_CHECKING:
    import paramiko

BOOT_DIR = ".boot"
RECORD = "ssh.json"
OWNER = "owner.json"
KEY = "id_ed25519"
KNOWN_HOSTS = "known_hosts"
STALE_PARTIAL_S = 60.0  # a half-published directory older than this belongs to a killed boot
ESCAPE = b"\x1d"  # Ctrl-]
ESCAPE_NAME = "Ctrl-]"
EOT = b"\x04"  # Ctrl-D: end of input for the console's shell
SHELL_READY_TIMEOUT_S = 30.0
DRAIN_QUIET_S = 0.3  # after the console's shell exited: output still arriving within this is shown


# -- the boot's claim, and the published SSH record ------------------------------------------------

class BootOwner(BaseModel):
    """--root/.boot/<vm id>/owner.json: the `runuvm boot` process that owns the VM."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    vm: Annotated[str, Field(pattern=ID_RE.pattern)]
    pid: Annotated[int, Field(ge=1)]
    pid_start: Annotated[int, Field(ge=0)]  # its start time (/proc/<pid>/stat), so a reused pid is not it


class SshRecord(BaseModel):
    """--root/.boot/<vm id>/ssh.json: how to reach one VM booted with --ssh."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    vm: Annotated[str, Field(pattern=ID_RE.pattern)]
    port: Annotated[int, Field(ge=1, le=65535)]
    key: Annotated[str, Field(min_length=1, max_length=4096)]
    host_key: Annotated[str, Field(pattern=r"^ssh-ed25519 [A-Za-z0-9+/]{68}$")]


def boot_dir(root: Path) -> Path:
    return root / BOOT_DIR


def process_start(pid: int) -> int | None:
    """The start time of process pid (clock ticks since boot), None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def owner_alive(owner: BootOwner) -> bool:
    return process_start(owner.pid) == owner.pid_start


def read_owner(directory: Path) -> BootOwner:
    """Raises OSError (no claim) or ValidationError (not one)."""
    return BootOwner.model_validate_json((directory / OWNER).read_bytes())


def read_record(directory: Path) -> SshRecord:
    """Raises OSError (no record) or ValidationError (not one)."""
    return SshRecord.model_validate_json((directory / RECORD).read_bytes())


@dataclass
class BootClaim:
    """--root/.boot/<vm id>/ while one `runuvm boot` owns that VM; remove() when the VM is gone."""

    directory: Path

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class SshAccess:
    """A published record (in the boot's claim); remove() takes it and the private key away again."""

    directory: Path
    record: SshRecord

    @property
    def key(self) -> Path:
        return self.directory / KEY

    def remove(self) -> None:
        for name in (RECORD, KEY, KNOWN_HOSTS):
            with contextlib.suppress(FileNotFoundError):
                (self.directory / name).unlink()

    def instructions(self) -> str:
        r = self.record
        return (f"VM {r.vm}: SSH on 127.0.0.1:{r.port} as root, key {self.key}\n"
                f"  runuvm ssh {r.vm} [CMD...]\n"
                f"  ssh -i {self.key} -p {r.port} -o UserKnownHostsFile={self.directory / KNOWN_HOSTS} root@127.0.0.1")


def _remove_stale(directory: Path) -> None:
    """What a killed boot left: its QEMU (dying of the parent-death signal, or not), run directory, claim."""
    leftovers.clean(directory)
    shutil.rmtree(directory, ignore_errors=True)


def sweep_stale(root: Path) -> list[str]:
    """Remove what VMs whose boot process is gone (killed outright) left; their VM ids."""
    base = boot_dir(root)
    if not base.is_dir():
        return []
    removed = []
    for d in base.iterdir():
        if d.name.startswith("."):  # being claimed, or left by a boot killed while claiming
            with contextlib.suppress(OSError):
                if time.time() - d.stat().st_mtime > STALE_PARTIAL_S:
                    _remove_stale(d)
            continue
        try:
            stale = not owner_alive(read_owner(d))
        except (OSError, ValidationError):
            stale = True
        if stale:
            _remove_stale(d)
            removed.append(d.name)
    return removed


def running_ssh_vms(root: Path) -> list[str]:
    base = boot_dir(root)
    return sorted(d.name for d in base.iterdir() if not d.name.startswith(".") and (d / RECORD).exists()) \
        if base.is_dir() else []


def claim_boot(root: Path, vm: UtilityVM) -> BootClaim:
    """Before the VM starts: write --root/.boot/<vm id>/ whole (built under a hidden name, then
    renamed) naming this process as its owner and the VM's run directory (and libvirt domain) as a
    dead shim's would be recorded (shim.containerd.leftovers), so that a boot killed outright, even mid-start,
    leaves nothing the next `runuvm boot` or `runuvm ssh` does not remove. Raises RunuvmError."""
    sweep_stale(root)
    base = boot_dir(root)
    final = base / vm.id
    tmp = base / f".{vm.id}-{secrets.token_hex(4)}"
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        base.mkdir(exist_ok=True, mode=0o700)
        tmp.mkdir(mode=0o700)
        owner = BootOwner(vm=vm.id, pid=os.getpid(), pid_start=process_start(os.getpid()) or 0)
        (tmp / OWNER).write_text(owner.model_dump_json())
        leftovers.record(tmp, {"vm_id": vm.id, "run_dir": str(vm.config.run_dir / vm.id), "backend": vm.config.backend,
                               "libvirt_uri": vm.config.libvirt_uri})
        os.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunuvmError(f"boot: VM {vm.id}: cannot record it under {base}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BootClaim(final)


def publish_ssh(claim: BootClaim, vm_id: str, port: int, key: ClientKey, host_key: str) -> SshAccess:
    """Add how to reach the VM over SSH to its claim; ssh.json, which finders read, comes last and
    whole (renamed into place). Raises SshError."""
    d = claim.directory
    record = SshRecord(vm=vm_id, port=port, key=str(d / KEY), host_key=host_key)
    try:
        key.write_private(d / KEY)
        (d / KNOWN_HOSTS).write_text(known_hosts_line(port, host_key) + "\n")
        leftovers.write_atomic(d / RECORD, record.model_dump_json())
    except OSError as e:
        SshAccess(d, record).remove()
        raise SshError(f"VM {vm_id}: cannot publish its SSH access under {d}: {e.strerror or e}", vm_id=vm_id) from None
    return SshAccess(d, record)


async def start_ssh(vm: UtilityVM, claim: BootClaim) -> SshAccess:
    """Start the VM's SSH server with a new key pair and publish the access. Raises SshError, UvmError."""
    assert vm.spec is not None and vm.spec.ssh_port is not None
    key = ClientKey.generate(f"runuvm@{vm.id}")
    host_key = await enable_ssh(vm, key)
    return publish_ssh(claim, vm.id, vm.spec.ssh_port, key, host_key)


# -- SSH: `runuvm ssh VMID [CMD...]` ---------------------------------------------------------------

def find_ssh(root: Path, vm_id: str) -> SshRecord:
    """The record of a running VM booted with --ssh. Raises RunuvmError naming the problem."""
    if not ID_RE.fullmatch(vm_id):
        raise RunuvmError(f"ssh: {vm_id!r} is not a VM id")
    gone = sweep_stale(root)
    if vm_id in gone:
        raise RunuvmError(f"ssh {vm_id}: that VM is gone (its `runuvm boot` process was killed)")
    try:
        return read_record(boot_dir(root) / vm_id)
    except FileNotFoundError:
        if (boot_dir(root) / vm_id / OWNER).exists():
            raise RunuvmError(f"ssh {vm_id}: that VM was booted without --ssh (or its SSH server is still "
                              "starting)") from None
        others = running_ssh_vms(root)
        running = f"running: {', '.join(others)}" if others else "none is running"
        raise RunuvmError(f"ssh {vm_id}: no VM with that id was booted with `runuvm boot --ssh` under {root} "
                          f"({running})") from None
    except (OSError, ValidationError) as e:
        raise RunuvmError(f"ssh {vm_id}: unreadable record {boot_dir(root) / vm_id / RECORD}: {e}") from None


def ssh_command(root: Path, vm_id: str, argv: list[str]) -> int:
    """`runuvm ssh`: run argv (joined into one shell command line, as ssh does) in the VM, or a shell
    when argv is empty; the remote exit code. Raises RunuvmError."""
    record = find_ssh(root, vm_id)
    if not argv and not os.isatty(0):
        raise RunuvmError(f"ssh {vm_id}: give a command (a shell needs a terminal on stdin)")
    try:
        client = connect(record.port, Path(record.key), record.host_key)
    except SshError as e:
        raise RunuvmError(f"ssh {vm_id}: {e}") from None
    with contextlib.closing(client):
        if argv:
            return run_command(client, " ".join(argv), stdin_fd=0)
        return interactive_shell(client)


def interactive_shell(client: paramiko.SSHClient, fd: int = 0, out_fd: int = 1) -> int:
    """A shell on a pty sized like our terminal (raw mode meanwhile, resized with it); its exit code."""
    import select

    import paramiko

    from uvm.ssh import exit_code
    from uvm.ssh import write_all as write_blocking

    cols, rows = os.get_terminal_size(fd)
    chan = client.invoke_shell(term=os.environ.get("TERM", "vt100"), width=cols, height=rows)

    def on_winch(*_: object) -> None:
        with contextlib.suppress(OSError, paramiko.SSHException):
            c, r = os.get_terminal_size(fd)
            chan.resize_pty(width=c, height=r)

    previous = signal.signal(signal.SIGWINCH, on_winch)
    fd_closed = False
    try:
        with contextlib.closing(chan), raw_terminal(fd):
            while True:
                ready, _, _ = select.select([chan.fileno(), fd], [], [])
                if chan.fileno() in ready:
                    data = chan.recv(32768)
                    if not data:
                        break
                    write_blocking(out_fd, data)
                if fd in ready:
                    data = os.read(fd, 4096)
                    if not data:
                        fd_closed = True
                        break
                    chan.sendall(data)
            if fd_closed:
                return 0  # our input ended: the shell was left, not finished
            return exit_code(chan.recv_exit_status())  # sent with (or just after) the end of its output
    finally:
        signal.signal(signal.SIGWINCH, previous)


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """fd's terminal in raw mode (every key, Ctrl-C included, goes through), restored afterwards."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)  # not tty's default TCSAFLUSH: keys typed already are kept
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# -- the serial console ---------------------------------------------------------------------------

def split_at_escape(data: bytes) -> tuple[bytes, bool]:
    """(the bytes to send, whether the escape came): everything before the first Ctrl-]."""
    i = data.find(ESCAPE)
    return (data, False) if i < 0 else (data[:i], True)


def end_of_input(last_sent: bytes) -> bytes:
    """What ends the console shell's input like a user would: finish the last line, then Ctrl-D."""
    return EOT if not last_sent or last_sent.endswith(b"\n") else b"\n" + EOT


def prompt_of(vm_id: str) -> bytes:
    """The console shell's first prompt (PS1 below, in its home directory)."""
    return f"{vm_id}:~# ".encode()


def console_shell(vm_id: str) -> oci.Process:
    """The shell on ttyS0. Its prompt names the VM by the host's id (not the guest's hostname)."""
    term = os.environ.get("TERM", "vt100") if os.isatty(0) else "dumb"
    return oci.Process(args=["cttyhack", "sh"], cwd="/root",
                       env=["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", f"TERM={term}", f"PS1={vm_id}:\\w# "])


class ConsoleRelay:
    """One attachment to a VM's serial console: our stdin -> the console, the console -> our stdout."""

    def __init__(self, vm: UtilityVM, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 stdin_fd: int, stdout_fd: int) -> None:
        self.vm = vm
        self.reader = reader
        self.writer = writer
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.interactive = os.isatty(stdin_fd)
        self.last_sent = b""
        self._resize: asyncio.Task[None] | None = None

    async def _set_size(self) -> None:
        cols, rows = os.get_terminal_size(self.stdin_fd)
        with contextlib.suppress(UvmError):
            await self.vm.run(["stty", "-F", "/dev/ttyS0", "rows", str(rows), "cols", str(cols)])

    def _on_winch(self) -> None:
        if self._resize is None or self._resize.done():
            self._resize = asyncio.get_running_loop().create_task(self._set_size(), name=f"{self.vm.id}-console-size")

    async def _copy_out(self) -> None:
        while data := await self.reader.read(65536):
            await write_all(self.stdout_fd, data, stall_timeout=3600)

    async def _copy_in(self) -> bool:
        """Our input to the console until Ctrl-] (True) or end of input (False)."""
        while data := await read_input(self.stdin_fd):
            data, detach = split_at_escape(data)
            if data:
                self.writer.write(data)
                await self.writer.drain()
                self.last_sent = data
            if detach:
                return True
        return False

    async def _drain_quietly(self) -> None:
        """Show what the console still prints after the shell exited, until it is quiet."""
        with contextlib.suppress(TimeoutError):
            while data := await asyncio.wait_for(self.reader.read(65536), DRAIN_QUIET_S):
                await write_all(self.stdout_fd, data, stall_timeout=3600)

    async def _wait_for_prompt(self) -> None:
        """Show the console's output until the shell's first prompt: the UART driver drops what arrives
        while nobody has ttyS0 open, and piped input typed after the prompt reads like a session."""
        prompt = prompt_of(self.vm.id)
        seen = b""
        try:
            async with asyncio.timeout(SHELL_READY_TIMEOUT_S):
                while prompt not in seen:
                    data = await self.reader.read(65536)
                    if not data:
                        raise UvmError(f"VM {self.vm.id}: console: the VM closed it (stopped?)", vm_id=self.vm.id)
                    await write_all(self.stdout_fd, data, stall_timeout=3600)
                    seen = seen[-len(prompt):] + data
        except TimeoutError:
            raise UvmError(f"VM {self.vm.id}: console: no shell prompt within {SHELL_READY_TIMEOUT_S:g}s",
                           vm_id=self.vm.id) from None

    async def run(self) -> int:
        """Relay until Ctrl-], the shell's exit or the VM's; the shell's exit code (0 when detached)."""
        if self.interactive:
            await self._set_size()
        shell = await self.vm.create_process(console_shell(self.vm.id), stdout=False, stderr=False)
        tasks: list[asyncio.Task[object]] = []
        loop = asyncio.get_running_loop()
        try:
            # Raw before the prompt shows: keys typed meanwhile wait unechoed in our terminal's buffer.
            with raw_terminal(self.stdin_fd) if self.interactive else contextlib.nullcontext():
                await self._wait_for_prompt()
                if self.interactive:
                    loop.add_signal_handler(signal.SIGWINCH, self._on_winch)
                out = loop.create_task(self._copy_out(), name=f"{self.vm.id}-console-out")
                inp = loop.create_task(self._copy_in(), name=f"{self.vm.id}-console-in")
                exited = loop.create_task(shell.wait(), name=f"{self.vm.id}-console-shell")
                tasks += [out, inp, exited]
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                if inp in done and not inp.result():  # end of piped input: end the shell with it
                    self.writer.write(end_of_input(self.last_sent))
                    await self.writer.drain()
                    done, _ = await asyncio.wait((out, exited), return_when=asyncio.FIRST_COMPLETED)
                if exited in done:
                    out.cancel()
                    await asyncio.gather(out, return_exceptions=True)
                    await self._drain_quietly()
                    return shell.exit_code
                if out in done:
                    out.result()
                    raise UvmError(f"VM {self.vm.id}: console: the VM closed it (stopped?)")
                return 0  # detached
        finally:
            if self.interactive:
                loop.remove_signal_handler(signal.SIGWINCH)
            for t in (*tasks, self._resize):
                if t is not None:
                    t.cancel()
            await asyncio.gather(*(t for t in (*tasks, self._resize) if t is not None), return_exceptions=True)
            if not shell.exited:
                with contextlib.suppress(UvmError):
                    await shell.kill()
            shell.close()


async def attach_console(vm: UtilityVM, stdin_fd: int = 0, stdout_fd: int = 1) -> int:
    """Attach our stdin/stdout to the VM's serial console (see the module doc); the console shell's exit
    code, 0 when detached with Ctrl-]. Raises UvmError (no console socket, VM gone)."""
    if vm.spec is None or not vm.spec.console_socket:
        raise UvmError(f"VM {vm.id}: console: the VM was configured without console_socket", vm_id=vm.id)
    path = vm.spec.run_dir / CONSOLE_SOCKET
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
    except OSError as e:
        raise UvmError(f"VM {vm.id}: console {path}: cannot connect: {e.strerror or e}", vm_id=vm.id) from None
    print(f"[runuvm] console of VM {vm.id}: {ESCAPE_NAME} detaches (and stops the VM)", file=sys.stderr, flush=True)
    try:
        return await ConsoleRelay(vm, reader, writer, stdin_fd, stdout_fd).run()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
