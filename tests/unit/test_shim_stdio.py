"""shim.containerd.stdio: containerd's stdio FIFOs (real ones, from os.mkfifo) relayed to and from a process's streams."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import pytest

from shim.containerd.stdio import ProcessIO, open_fifo_reader, open_fifo_writer, read_some, write_all
from uvm import errors
from uvm.process import Process

pytestmark = pytest.mark.timeout(10)


def open_fds() -> int:
    """This process's open descriptors, after the garbage of earlier tests (sockets, pipes) is collected:
    a count that an unrelated finalizer cannot change between two readings."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def fifos(tmp_path: Path) -> Iterator[dict[str, str]]:
    paths = {name: str(tmp_path / f"t-{name}") for name in ("stdin", "stdout", "stderr")}
    for path in paths.values():
        os.mkfifo(path)
    yield paths


def read_available(fd: int) -> bytes:
    """Everything currently in a non-blocking FIFO."""
    data = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


class FakeOutput:
    """A process's stdout/stderr as ProcessIO reads it: chunks, then b"" (end of stream)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.closed = False

    async def read(self, n: int) -> bytes:
        await asyncio.sleep(0)
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        assert len(chunk) <= n
        return chunk

    def close(self) -> None:
        self.closed = True


class FakeProcess:
    """The part of uvm.process.Process that ProcessIO uses."""

    def __init__(self, stdout: list[bytes] | None = None, stderr: list[bytes] | None = None,
                 stdin: bool = True) -> None:
        self.stdout = FakeOutput(stdout) if stdout is not None else None
        self.stderr = FakeOutput(stderr) if stderr is not None else None
        self.stdin: object | None = object() if stdin else None
        self.stdin_data = b""
        self.stdin_grew = asyncio.Event()
        self.stdin_closed = asyncio.Event()
        self.close_stdin_calls = 0

    async def write_stdin(self, data: bytes) -> None:
        self.stdin_data += data
        self.stdin_grew.set()

    async def received(self, expected: bytes, timeout: float = 10.0) -> None:
        """Wait until the input delivered so far is expected (the copy runs in its own time)."""
        async with asyncio.timeout(timeout):
            while self.stdin_data != expected:
                self.stdin_grew.clear()
                await self.stdin_grew.wait()

    def close_stdin(self) -> None:
        self.close_stdin_calls += 1
        self.stdin_closed.set()

    def as_process(self) -> Process:
        return cast(Process, self)


# -- open ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["stdin", "stdout", "stderr"])
async def test_open_with_a_missing_path_names_it_and_leaks_no_fd(fifos: dict[str, str], tmp_path: Path,
                                                           missing: str) -> None:
    paths = {**fifos, missing: str(tmp_path / "absent")}
    pio = ProcessIO("t", paths["stdin"], paths["stdout"], paths["stderr"], terminal=False)
    before = open_fds()
    with pytest.raises(errors.InvalidArgumentError) as info:
        await pio.open()
    assert str(tmp_path / "absent") in str(info.value)
    assert missing in str(info.value)
    assert open_fds() == before


async def test_open_without_paths_opens_nothing() -> None:
    pio = ProcessIO("t", "", "", "", terminal=False)
    before = open_fds()
    await pio.open()
    assert pio.wants == (False, False, False)
    assert open_fds() == before
    await pio.close()


def test_terminal_merges_stderr_into_stdout(fifos: dict[str, str]) -> None:
    pio = ProcessIO("t", fifos["stdin"], fifos["stdout"], fifos["stderr"], terminal=True)
    assert pio.wants == (True, True, False)


def test_open_fifo_helpers_name_the_path(tmp_path: Path) -> None:
    for opener in (open_fifo_reader, open_fifo_writer):
        with pytest.raises(errors.InvalidArgumentError, match=f"t: stdout {tmp_path}/nope: cannot open"):
            opener(str(tmp_path / "nope"), "t: stdout")


# -- write_all / read_some -------------------------------------------------------------------------------


async def test_write_all_delivers_every_byte_to_a_reader(fifos: dict[str, str]) -> None:
    data = bytes(range(256)) * (4 * 4096)  # 4 MiB
    assert len(data) == 4 << 20
    fd = open_fifo_writer(fifos["stdout"], "stdout")
    received = bytearray()
    reader_fd = os.open(fifos["stdout"], os.O_RDONLY)  # does not block: fd is a writer

    def drain() -> None:
        while chunk := os.read(reader_fd, 1 << 16):
            received.extend(chunk)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        await write_all(fd, data, stall_timeout=5.0)
    finally:
        os.close(fd)  # the last writer: the reader sees end of file
    await asyncio.to_thread(thread.join, 5.0)
    os.close(reader_fd)
    assert not thread.is_alive()
    assert bytes(received) == data


async def test_write_all_times_out_when_nobody_reads(fifos: dict[str, str]) -> None:
    fd = open_fifo_writer(fifos["stdout"], "stdout")
    try:
        with pytest.raises(TimeoutError):  # (the module's 10 s timeout fails a write_all that never gives up)
            await write_all(fd, b"x" * (8 << 20), stall_timeout=0.1)  # more than any pipe buffer holds
    finally:
        os.close(fd)


async def test_read_some_waits_for_a_writer_then_reads_then_eof(fifos: dict[str, str]) -> None:
    fd = open_fifo_reader(fifos["stdin"], "stdin")
    try:
        pending = asyncio.create_task(read_some(fd))
        await asyncio.sleep(0.2)
        assert not pending.done(), f"read_some returned {pending.result()!r} before any writer connected"
        writer = os.open(fifos["stdin"], os.O_WRONLY | os.O_NONBLOCK)
        os.write(writer, b"abc")
        os.close(writer)
        assert await asyncio.wait_for(pending, 2.0) == b"abc"
        assert await asyncio.wait_for(read_some(fd), 2.0) == b""
    finally:
        os.close(fd)


async def test_read_some_can_be_cancelled_and_leaves_no_reader(fifos: dict[str, str]) -> None:
    fd = open_fifo_reader(fifos["stdin"], "stdin")
    try:
        pending = asyncio.create_task(read_some(fd))
        await asyncio.sleep(0.05)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        # The fd is not registered any more: a fresh read_some can register it again.
        again = asyncio.create_task(read_some(fd))
        writer = os.open(fifos["stdin"], os.O_WRONLY | os.O_NONBLOCK)
        os.write(writer, b"z")
        os.close(writer)
        assert await asyncio.wait_for(again, 2.0) == b"z"
    finally:
        os.close(fd)


# -- attach / drained / close ----------------------------------------------------------------------------


async def test_attach_relays_output_in_order_and_drained_waits_for_it(fifos: dict[str, str]) -> None:
    baseline = open_fds()
    out_chunks = [b"one\n", b"two\n", b"x" * 10000, b"three\n"]
    err_chunks = [b"warn 1\n", b"warn 2\n"]
    proc = FakeProcess(stdout=out_chunks, stderr=err_chunks, stdin=False)
    pio = ProcessIO("t", "", fifos["stdout"], fifos["stderr"], terminal=False)
    await pio.open()
    out_fd = os.open(fifos["stdout"], os.O_RDONLY | os.O_NONBLOCK)
    err_fd = os.open(fifos["stderr"], os.O_RDONLY | os.O_NONBLOCK)
    try:
        pio.attach(proc.as_process())
        await asyncio.wait_for(pio.drained(), 2.0)
        assert read_available(out_fd) == b"".join(out_chunks)
        assert read_available(err_fd) == b"".join(err_chunks)
        assert proc.stdout is not None and proc.stdout.chunks == []
        assert proc.stdin_closed.is_set() is False  # no stdin FIFO: nothing to close
    finally:
        os.close(out_fd)
        os.close(err_fd)
        await pio.close()
    assert open_fds() == baseline


async def test_the_reader_sees_end_of_file_once_the_output_ended(fifos: dict[str, str]) -> None:
    """As runc's shim closes its FIFO writer when the process's pipe ends: CRI's ExecSync waits for that end
    of file after the exit (a writer kept until Delete hung every ExecSync)."""
    proc = FakeProcess(stdout=[b"out\n"], stderr=[b"err\n"], stdin=False)
    pio = ProcessIO("t", "", fifos["stdout"], fifos["stderr"], terminal=False)
    await pio.open()
    fds = [os.open(fifos[name], os.O_RDONLY | os.O_NONBLOCK) for name in ("stdout", "stderr")]
    try:
        pio.attach(proc.as_process())
        await asyncio.wait_for(pio.drained(), 10.0)
        for fd, expected in zip(fds, (b"out\n", b"err\n"), strict=True):
            assert os.read(fd, 100) == expected
            assert os.read(fd, 100) == b""  # end of file: no writer is left (not BlockingIOError)
    finally:
        for fd in fds:
            os.close(fd)
        await pio.close()


async def test_drained_waits_for_a_slow_reader(fifos: dict[str, str]) -> None:
    """More output than the FIFO holds: drained() returns only once the reader took all of it."""
    chunks = [bytes([i]) * 65536 for i in range(16)]  # 1 MiB, in the order it must arrive
    proc = FakeProcess(stdout=chunks, stdin=False)
    pio = ProcessIO("t", "", fifos["stdout"], "", terminal=False)
    await pio.open()
    reader_fd = os.open(fifos["stdout"], os.O_RDONLY)
    received = bytearray()
    total = sum(map(len, chunks))

    def drain() -> None:
        while len(received) < total and (chunk := os.read(reader_fd, 1 << 16)):
            received.extend(chunk)

    try:
        pio.attach(proc.as_process())
        await asyncio.sleep(0.05)
        assert not received  # nobody read yet, and the writer is waiting
        thread = threading.Thread(target=drain, daemon=True)
        thread.start()
        await asyncio.wait_for(pio.drained(), 5.0)
        await asyncio.to_thread(thread.join, 5.0)
        assert bytes(received) == b"".join(chunks)
    finally:
        os.close(reader_fd)
        await pio.close()


async def test_terminal_relays_only_stdout(fifos: dict[str, str]) -> None:
    proc = FakeProcess(stdout=[b"tty output"], stderr=[b"never read"], stdin=False)
    pio = ProcessIO("t", "", fifos["stdout"], fifos["stderr"], terminal=True)
    await pio.open()
    out_fd = os.open(fifos["stdout"], os.O_RDONLY | os.O_NONBLOCK)
    try:
        pio.attach(proc.as_process())
        await asyncio.wait_for(pio.drained(), 2.0)
        assert read_available(out_fd) == b"tty output"
        assert proc.stderr is not None and proc.stderr.chunks == [b"never read"]
    finally:
        os.close(out_fd)
        await pio.close()


@contextlib.asynccontextmanager
async def with_stdin(fifos: dict[str, str]) -> AsyncIterator[tuple[FakeProcess, ProcessIO]]:
    """A process with stdin and its ProcessIO (stdin and stdout FIFOs), open and attached; closed afterwards."""
    proc = FakeProcess(stdout=[], stdin=True)
    pio = ProcessIO("t", fifos["stdin"], fifos["stdout"], "", terminal=False)
    await pio.open()
    try:
        pio.attach(proc.as_process())
        pio.attach_stdin(proc.as_process())
        yield proc, pio
    finally:
        await pio.close()


async def test_stdin_outlives_its_clients_until_close_io(fifos: dict[str, str]) -> None:
    """As runc's shim: a client that closes its end (a detached `ctr run`, an attach that ends) is not the
    process's end of file; CloseIO is, once the clients' writers are gone as well."""
    async with with_stdin(fifos) as (proc, pio):
        sent = b""
        for words in (b"hello ", b"world\n"):  # two clients, one after the other
            writer = os.open(fifos["stdin"], os.O_WRONLY | os.O_NONBLOCK)
            os.write(writer, words)
            os.close(writer)
            sent += words
            await proc.received(sent)  # the first client's end was not the input's end
        assert not proc.stdin_closed.is_set()
        await asyncio.wait_for(pio.close_stdin(proc.as_process()), 2.0)
        await asyncio.wait_for(proc.stdin_closed.wait(), 2.0)
        assert proc.stdin_data == b"hello world\n"
        assert proc.close_stdin_calls == 1


async def test_close_io_before_the_client_closes_delivers_everything_then_eof(fifos: dict[str, str]) -> None:
    """ctr's order: its stdin reaches end of file, it calls CloseIO, and only then closes its FIFO end."""
    async with with_stdin(fifos) as (proc, pio):
        writer = os.open(fifos["stdin"], os.O_WRONLY | os.O_NONBLOCK)
        os.write(writer, b"last words")
        await asyncio.wait_for(pio.close_stdin(proc.as_process()), 0.5)  # returns at once
        await asyncio.sleep(0.1)
        assert not proc.stdin_closed.is_set()  # the client may still write
        os.write(writer, b", really")
        os.close(writer)
        await asyncio.wait_for(proc.stdin_closed.wait(), 2.0)
        assert proc.stdin_data == b"last words, really"


def writer_can_connect(path: str) -> bool:
    """Whether a client's non-blocking write-only open of the FIFO finds a reader (else ENXIO)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        return True
    except OSError as e:
        assert e.errno == errno.ENXIO, e
        return False


async def test_the_stdin_fifo_has_no_reader_until_the_start(fifos: dict[str, str]) -> None:
    """ctr's stdin copy (containerd's fifo package) waits until the FIFO has a reader; its input therefore
    cannot reach its end, with no CloseIO to follow, before ctr's Exec/NewTask call returned
    (containerd#4489: `ctr task exec ... cat` with a short line piped in hung). The reader appears at the start."""
    proc = FakeProcess(stdout=[], stdin=True)
    pio = ProcessIO("t", fifos["stdin"], fifos["stdout"], "", terminal=False)
    await pio.open()  # the create (Exec, or the init's Create)
    try:
        pio.attach(proc.as_process())
        assert not writer_can_connect(fifos["stdin"])
        pio.attach_stdin(proc.as_process())  # the start
        assert writer_can_connect(fifos["stdin"])
    finally:
        await pio.close()


async def test_close_io_before_the_start_still_ends_the_input(fifos: dict[str, str]) -> None:
    """A CloseIO that comes before the start (a client with no input at all): once started, the process
    gets what clients wrote and then end of file, without waiting for another CloseIO."""
    proc = FakeProcess(stdout=[], stdin=True)
    pio = ProcessIO("t", fifos["stdin"], fifos["stdout"], "", terminal=False)
    await pio.open()
    try:
        await pio.close_stdin(proc.as_process())
        assert not proc.stdin_closed.is_set()  # not before the start: its input may still come
        pio.attach_stdin(proc.as_process())
        writer = os.open(fifos["stdin"], os.O_WRONLY | os.O_NONBLOCK)
        os.write(writer, b"late")
        os.close(writer)
        await asyncio.wait_for(proc.stdin_closed.wait(), 2.0)
        assert proc.stdin_data == b"late"
    finally:
        await pio.close()


async def test_a_stdin_path_that_is_not_a_fifo_fails_the_create(fifos: dict[str, str], tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    pio = ProcessIO("t", str(plain), fifos["stdout"], "", terminal=False)
    with pytest.raises(errors.InvalidArgumentError, match="not a FIFO or a terminal"):
        await pio.open()


async def test_close_io_without_any_client_is_eof(fifos: dict[str, str]) -> None:
    async with with_stdin(fifos) as (proc, pio):
        await asyncio.sleep(0.05)
        assert not proc.stdin_closed.is_set()
        await pio.close_stdin(proc.as_process())
        await asyncio.wait_for(proc.stdin_closed.wait(), 2.0)
        assert proc.stdin_data == b""


async def test_close_is_idempotent_and_closes_every_fd(fifos: dict[str, str]) -> None:
    baseline = open_fds()
    proc = FakeProcess(stdout=[b"a"], stderr=[b"b"], stdin=True)
    pio = ProcessIO("t", fifos["stdin"], fifos["stdout"], fifos["stderr"], terminal=False)
    await pio.open()
    assert open_fds() == baseline + 2  # stdout, stderr; stdin waits for the start
    pio.attach(proc.as_process())
    pio.attach_stdin(proc.as_process())
    assert open_fds() == baseline + 4  # and stdin twice (our reader and our writer)
    await asyncio.sleep(0.05)  # the copies run; stdin waits for a client that never comes
    await asyncio.wait_for(pio.close(), 2.0)
    assert open_fds() == baseline
    assert proc.stdin_closed.is_set()  # the stdin copy was stopped: the process gets EOF
    await pio.close()
    assert open_fds() == baseline


async def test_close_stops_an_output_copy_blocked_on_a_full_fifo(fifos: dict[str, str]) -> None:
    baseline = open_fds()
    proc = FakeProcess(stdout=[b"x" * 65536] * 32, stdin=False)  # 2 MiB, nobody reads
    pio = ProcessIO("t", "", fifos["stdout"], "", terminal=False)
    await pio.open()
    pio.attach(proc.as_process())
    await asyncio.sleep(0.1)
    await asyncio.wait_for(pio.close(), 2.0)
    assert open_fds() == baseline


# -- file:// and binary:// outputs (runc's shim's log URIs) ------------------------------------------------

LOGGER = """#!/bin/sh
# A logging binary as containerd's shims run it: stdout on fd 3, stderr on fd 4, fd 5 closed when ready.
out="$1"
exec 5>&-
{ echo "env $CONTAINER_ID $CONTAINER_NAMESPACE args $*"; cat <&3 | sed 's/^/out: /'; cat <&4 | sed 's/^/err: /'; } > "$out.tmp"
mv "$out.tmp" "$out"
"""


def waiting_logger(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "logger"
    script.write_text(body)
    script.chmod(0o755)
    return script


async def test_a_file_uri_appends_both_outputs_to_the_file(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "c1.log"
    uri = f"file://{log_file}"
    pio = ProcessIO("t", "", uri, uri, terminal=False)
    before = open_fds()
    await pio.open()
    pio.attach(FakeProcess(stdout=[b"one\n", b"two\n"], stderr=[b"oops\n"], stdin=False).as_process())
    await pio.drained()
    await pio.close()
    assert sorted(log_file.read_bytes().splitlines()) == [b"one", b"oops", b"two"]
    assert open_fds() == before


async def test_a_binary_uri_starts_the_logger_feeds_it_and_stops_it(tmp_path: Path) -> None:
    script = waiting_logger(tmp_path, LOGGER)
    out = tmp_path / "logged"
    uri = f"binary://{script}?{out}"  # a query key with no value: one argument, then an empty one
    pio = ProcessIO("t", "", uri, uri, terminal=False, container_id="c1", namespace="ns1")
    before = open_fds()
    await pio.open()
    assert pio._logger is not None
    logger = pio._logger.proc
    pio.attach(FakeProcess(stdout=[b"one\n", b"two\n"], stderr=[b"oops\n"], stdin=False).as_process())
    await pio.drained()
    await pio.close()
    assert logger.returncode == 0  # it saw the end of its input and finished by itself
    assert out.read_text() == f"env c1 ns1 args {out} \nout: one\nout: two\nerr: oops\n"
    assert open_fds() == before


async def test_a_logger_that_ignores_the_end_of_its_input_is_terminated(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shim.containerd.stdio.LOGGER_EOF_GRACE_S", 0.1)
    script = waiting_logger(tmp_path, "#!/bin/sh\nexec 5>&-\nexec sleep 30\n")
    pio = ProcessIO("t", "", f"binary://{script}", "", terminal=False)
    await pio.open()
    assert pio._logger is not None
    logger = pio._logger.proc
    await pio.close()
    assert logger.returncode == -15


@pytest.mark.parametrize("uri, problem", [
    ("https://example.com/log", "unknown stdio scheme 'https'"),
    ("binary:///nonexistent/logger", "/nonexistent/logger is not an executable file"),
    ("binary:///tmp", "/tmp is not an executable file"),
    ("file:///proc/nope/log", "cannot open"),
])
async def test_a_bad_output_uri_is_named_and_leaves_nothing(uri: str, problem: str) -> None:
    pio = ProcessIO("t", "", uri, uri, terminal=False)
    before = open_fds()
    with pytest.raises(errors.InvalidArgumentError, match="t: stdout") as info:
        await pio.open()
    assert problem in str(info.value)
    assert open_fds() == before


async def test_a_logger_never_ready_is_stopped_and_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shim.containerd.stdio.LOGGER_READY_TIMEOUT_S", 0.3)
    monkeypatch.setattr("shim.containerd.stdio.LOGGER_EOF_GRACE_S", 0.1)
    script = waiting_logger(tmp_path, "#!/bin/sh\nexec sleep 30\n")
    pio = ProcessIO("t", "", f"binary://{script}", "", terminal=False)
    before = open_fds()
    with pytest.raises(errors.InvalidArgumentError, match="not ready after 0.3s"):
        await pio.open()
    assert open_fds() == before
    assert not [p for p in os.listdir("/proc") if p.isdigit() and str(script).encode() in _cmdline(p)]


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
