"""SSH into a UVM (`runuvm boot --ssh`): the host's half.

A VM whose config sets ``ssh_port`` has a virtio-net NIC on QEMU's user network (restricted: the
guest reaches nothing outside the VM) with 127.0.0.1:<port> on the host forwarded to the guest's
port 22 (uvm/builder.py, uvm/backends/qemu.py). Nothing runs on that NIC until ``enable_ssh``:

1. the host generates the VM's client key pair (Ed25519, ``ClientKey``); only the public half goes
   to the guest;
2. one agent RUN of ``GUEST_SETUP`` (the public key on its stdin) loads virtio_net, gives eth0
   slirp's static address, writes /root/.ssh/authorized_keys (tmpfs), makes a fresh host key and
   starts dropbear (Debian's dropbear-bin, in the rootfs) in the background;
3. the guest answers with its host key's public line, which the host checks (the guest is
   untrusted) and pins: ``connect`` refuses any other host key.

The paramiko calls (``connect``, ``run_command``) block: async code runs them in a thread.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import select
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from uvm.errors import UvmError

if TYPE_CHECKING:
    import paramiko

    from uvm.vm import UtilityVM

GUEST_ADDRESS = "10.0.2.15/24"  # QEMU user networking's (slirp's) fixed guest address and gateway
GUEST_GATEWAY = "10.0.2.2"
SETUP_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 60.0  # under emulation dropbear's key exchange alone takes seconds
HOST_KEY_RE = re.compile(rb"^(ssh-ed25519) ([A-Za-z0-9+/]{68})(?: \S{1,128})?$")

# Run by the agent as `sh -c GUEST_SETUP` with the client's public key on stdin. Prints one line, the
# host key's public line. Fails (non-zero, a reason on stderr) if anything does, dropbear's log included.
GUEST_SETUP = f"""set -e
[ ! -e /run/dropbear ] || {{ echo "an SSH server was already started in this VM" >&2; exit 3; }}
mkdir -m 700 /run/dropbear /root/.ssh
cat > /root/.ssh/authorized_keys
chmod 600 /root/.ssh/authorized_keys
modprobe virtio_net
n=0
while [ ! -e /sys/class/net/eth0 ]; do
  n=$((n + 1)); [ $n -le 1000 ] || {{ echo "no eth0 (is the VM's ssh_port set?)" >&2; exit 1; }}
  sleep 0.01
done
ip link set lo up
ip link set eth0 up
ip addr add {GUEST_ADDRESS} dev eth0
ip route add default via {GUEST_GATEWAY}
dropbearkey -t ed25519 -f /run/dropbear/host_key >/dev/null 2>&1
# -s: keys only, no passwords; -F -E: stay in the foreground (a child of the agent), log to a file.
dropbear -F -E -s -p 22 -r /run/dropbear/host_key -P /run/dropbear/pid </dev/null >/run/dropbear/log 2>&1 &
pid=$!
n=0
until netstat -ltn 2>/dev/null | grep -q ':22 '; do
  kill -0 $pid 2>/dev/null || {{ echo "dropbear exited: $(cat /run/dropbear/log)" >&2; exit 1; }}
  n=$((n + 1)); [ $n -le 1000 ] || {{ echo "dropbear is not listening after 10s" >&2; exit 1; }}
  sleep 0.01
done
dropbearkey -y -f /run/dropbear/host_key | grep '^ssh-ed25519 '
"""


class SshError(UvmError):
    """Setting up or using SSH into a UVM failed."""


@dataclass(frozen=True)
class ClientKey:
    """A per-VM client key pair: the private key in OpenSSH's format, the public key as one line."""

    private_openssh: bytes
    public_line: str

    @classmethod
    def generate(cls, comment: str) -> ClientKey:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        return cls(private, f"{public.decode()} {comment}")

    def write_private(self, path: Path) -> None:
        """Write the private key to a new file, mode 0600 from the start. Raises SshError."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise SshError(f"private key {path}: cannot create: {e.strerror}", path=str(path)) from None
        with os.fdopen(fd, "wb") as f:
            f.write(self.private_openssh)


def parse_host_key(output: bytes) -> str:
    """The guest's answer to GUEST_SETUP: its host key as 'ssh-ed25519 BASE64'. Raises SshError if the
    output is anything else (one line, an Ed25519 key blob of the right shape)."""
    line = output.strip()
    m = HOST_KEY_RE.fullmatch(line)
    if m is None:
        raise SshError(f"the guest's SSH host key is not one ssh-ed25519 line: {line[:200]!r}")
    blob = base64.b64decode(m.group(2))
    name = b"ssh-ed25519"
    expected = struct.pack(">I", len(name)) + name + struct.pack(">I", 32)
    if len(blob) != len(expected) + 32 or not blob.startswith(expected):
        raise SshError("the guest's SSH host key is not an Ed25519 public key blob")
    return f"{m.group(1).decode()} {m.group(2).decode()}"


async def enable_ssh(vm: UtilityVM, key: ClientKey) -> str:
    """Start the guest's SSH server accepting key; its host key line ('ssh-ed25519 BASE64').

    Raises SshError (no NIC, the setup failed in the guest, a malformed answer), or the agent's errors.
    """
    if vm.spec is None or vm.spec.ssh_port is None:
        raise SshError(f"VM {vm.id}: ssh: the VM was configured without ssh_port (no network device)", vm_id=vm.id)
    res = await vm.run(["sh", "-c", GUEST_SETUP], stdin=key.public_line.encode() + b"\n", timeout=SETUP_TIMEOUT_S)
    if res.exit_status != 0:
        why = res.stderr.decode(errors="replace").strip() or f"exit status {res.exit_status}, signal {res.signal}"
        raise SshError(f"VM {vm.id}: starting the SSH server failed: {why}", vm_id=vm.id)
    return parse_host_key(res.stdout)


def known_hosts_line(port: int, host_key: str) -> str:
    """The OpenSSH known_hosts line pinning host_key for 127.0.0.1:port."""
    return f"[127.0.0.1]:{port} {host_key}"


def connect(port: int, private_key: Path, host_key: str, timeout: float = CONNECT_TIMEOUT_S) -> paramiko.SSHClient:
    """A paramiko client logged in as root on 127.0.0.1:port, accepting only host_key. Blocking.

    Raises SshError naming what failed (connection, host key, authentication)."""
    import paramiko

    try:
        pkey = paramiko.Ed25519Key.from_private_key_file(str(private_key))
    except (OSError, paramiko.SSHException) as e:
        raise SshError(f"private key {private_key}: {e}", path=str(private_key)) from None
    kind, b64 = host_key.split(" ", 1)
    client = paramiko.SSHClient()
    client.get_host_keys().add(f"[127.0.0.1]:{port}", kind, paramiko.Ed25519Key(data=base64.b64decode(b64)))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect("127.0.0.1", port=port, username="root", pkey=pkey, look_for_keys=False, allow_agent=False,
                       timeout=timeout, banner_timeout=timeout, auth_timeout=timeout)
    except paramiko.BadHostKeyException:
        client.close()
        raise SshError(f"127.0.0.1:{port}: the server's host key is not the VM's (another server on that port?)",
                       port=port) from None
    except paramiko.AuthenticationException as e:
        client.close()
        raise SshError(f"127.0.0.1:{port}: authentication as root failed: {e}", port=port) from None
    except (OSError, paramiko.SSHException, EOFError) as e:
        client.close()
        raise SshError(f"127.0.0.1:{port}: cannot connect: {e or type(e).__name__}", port=port) from None
    return client


def exit_code(status: int) -> int:
    """paramiko's exit status (-1: none sent, e.g. killed by a signal) as a process exit code, as ssh does."""
    return 255 if status < 0 else status


def run_command(client: paramiko.SSHClient, command: str, stdin_fd: int | None = None, stdout_fd: int = 1,
                stderr_fd: int = 2) -> int:
    """Run command (a shell command line, as ssh runs it) and copy its output to stdout_fd/stderr_fd as it
    comes, feeding stdin_fd (None: no input) to it; its exit code. Blocking."""
    transport = client.get_transport()
    assert transport is not None
    chan = transport.open_session()
    with contextlib.closing(chan):
        chan.exec_command(command)
        if stdin_fd is None:
            chan.shutdown_write()
        while True:
            readers: list[int] = [chan.fileno()] + ([stdin_fd] if stdin_fd is not None else [])
            ready, _, _ = select.select(readers, [], [], 1.0)
            if stdin_fd is not None and stdin_fd in ready:
                data = os.read(stdin_fd, 32768)
                if data:
                    chan.sendall(data)
                else:
                    chan.shutdown_write()
                    stdin_fd = None
            while chan.recv_ready():
                write_all(stdout_fd, chan.recv(32768))
            while chan.recv_stderr_ready():
                write_all(stderr_fd, chan.recv_stderr(32768))
            if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready() and (
                    chan.eof_received or chan.closed):
                return exit_code(chan.recv_exit_status())


def write_all(fd: int, data: bytes) -> None:
    """Write all of data to fd (blocking or not). Blocking."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [])
