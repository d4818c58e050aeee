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


F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20


def set_pipe_size(fd: int, size: int = PIPE_SIZE) -> None:
    """Make the pipe of fd hold size bytes (64 KiB by default): fewer, larger reads for a relay."""
    import fcntl

    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, size)
    except OSError:  # above /proc/sys/fs/pipe-max-size: the default size serves too
        pass


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


# What Python (SIGPIPE, SIGXFSZ ignored) and the agent (SIGCHLD caught) changed, and what a child must see
# as default whatever the agent inherited.
RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
AGENT_CWD = os.getcwd()  # the agent's own ("/"); a child elsewhere needs fork


def find_program(name: str, env: dict[str, str]) -> str:
    """argv[0] as execvpe would find it: a path as is, else the first executable file on env's PATH."""
    if "/" in name:
        return name
    for d in env.get("PATH", DEFAULT_PATH).split(":"):
        path = f"{d or '.'}/{name}"
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    raise SpawnError(2, "exec " + name)  # ENOENT


def spawn(argv: list[str], env: dict[str, str], cwd: str, stdin: int, stdout: int, stderr: int,
          ctty: bool = False) -> int:
    """Start argv in a new session with the given fds as 0/1/2 and default signals. Returns the pid.

    With ctty, fd 0 (a pty slave) becomes the session's controlling terminal.

    posix_spawn (vfork: no copy of the agent's page tables, no copy-on-write faults, three times
    cheaper under emulation) unless the child needs a controlling terminal or another cwd, which
    posix_spawn cannot give it: then fork+exec. Every fd the agent opens is close-on-exec, so the
    child gets exactly 0/1/2. Raises SpawnError if exec (or chdir) failed.
    """
    if ctty or cwd != AGENT_CWD:
        return _fork_exec(argv, env, cwd, stdin, stdout, stderr, ctty)
    path = find_program(argv[0], env)
    try:
        return os.posix_spawn(path, argv, env, setsid=True, setsigdef=RESET_SIGNALS, setsigmask=(),
                              file_actions=[(os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, stdout, 1),
                                            (os.POSIX_SPAWN_DUP2, stderr, 2)])
    except OSError as e:
        raise SpawnError(e.errno or 0, "exec " + argv[0]) from None


def _fork_exec(argv: list[str], env: dict[str, str], cwd: str, stdin: int, stdout: int, stderr: int,
               ctty: bool) -> int:
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
            for sig in RESET_SIGNALS:
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


def remove_tree(path: str) -> bool:
    """Remove path and what is under it on path's own filesystem: a mount point inside (a container's
    rootfs still mounted) is neither entered nor removed. Errors are ignored; True if path is gone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if st.st_mode & 0o170000 != 0o040000:
        try:
            os.unlink(path)
        except OSError:
            return False
        return True
    _remove_dir(path, st.st_dev)
    return not os.path.lexists(path)


def _remove_dir(path: str, dev: int) -> None:
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except OSError:
        entries = []
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)
            elif entry.stat(follow_symlinks=False).st_dev == dev:
                _remove_dir(entry.path, dev)
        except OSError:
            pass
    try:
        os.rmdir(path)
    except OSError:
        pass


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
