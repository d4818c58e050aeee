"""Spawning and reaping processes in the guest (stdlib only).

The agent is PID 1, so it reaps every process in the UVM: one SIGCHLD-driven ``reap()`` collects
exit statuses with ``waitpid(-1, WNOHANG)`` and hands them to whoever spawned the pid. Nothing else
may call ``waitpid`` (that is why the agent does not use ``subprocess``).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
else:
    import _signal as signal  # the C module: `signal` imports enum (slow to start under emulation)


TIOCSCTTY = 0x540E
DEFAULT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def write_file(path: str, data: str) -> None:
    """Write data to path (created 0600, truncated): bundles, cgroup and /proc knobs. No open(): its
    io layers are code a clone's first requests would run on an empty TCG translation cache."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


class SpawnError(Exception):
    """The program could not be started (errno from exec, chdir, ...)."""

    def __init__(self, errno: int, what: str) -> None:
        super().__init__(f"{what}: {os.strerror(errno)}")
        self.errno = errno


def spawn(argv: list[str], env: dict[str, str], cwd: str, stdin: int, stdout: int, stderr: int,
          ctty: bool = False) -> int:
    """fork+exec argv in a new session with the given fds as 0/1/2. Returns the pid.

    With ctty, fd 0 (a pty slave) becomes the session's controlling terminal.

    Raises SpawnError if chdir or exec failed in the child (reported through a CLOEXEC pipe).
    """
    if ctty:
        import fcntl
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # child: only async-signal-safe-ish work until exec
        what = "setup"
        try:
            os.setsid()
            for target, fd in ((0, stdin), (1, stdout), (2, stderr)):
                os.dup2(fd, target, inheritable=True)
            if ctty:
                what = "set controlling terminal"
                fcntl.ioctl(0, TIOCSCTTY, 0)
            os.closerange(3, err_w)
            os.closerange(err_w + 1, 65536)
            for sig in (signal.SIGPIPE, signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            what = "chdir " + cwd
            os.chdir(cwd)
            what = "exec " + argv[0]
            os.execvpe(argv[0], argv, env)
        except OSError as e:
            os.write(err_w, f"{e.errno or 0}:{what}".encode())
        finally:
            os._exit(127)
    os.close(err_w)
    try:
        data = b""
        while True:
            chunk = os.read(err_r, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(err_r)
    if data:
        # The child is gone (it _exit()ed); its status is reaped by the agent's reaper and ignored.
        errno_text, _, what = data.decode(errors="replace").partition(":")
        raise SpawnError(int(errno_text or 0), what)
    return pid


def decode_status(status: int) -> tuple[int | None, int | None]:
    """(exit status, terminating signal) from a waitpid status."""
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    return os.WEXITSTATUS(status), None


def reap() -> list[tuple[int, int]]:
    """Every (pid, status) that has exited since the last call."""
    done = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        done.append((pid, status))
    return done
