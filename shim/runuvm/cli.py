"""`runuvm`: the runc/runhcs-style command line.

Container commands with runc's meaning (create, start, run, exec, kill, delete, list, state, ps,
pause, resume, resize-tty): each container is owned by a shim daemon serving containerd's task
service on a socket under --root (shim/runuvm/commands.py is the client). ``runuvm boot [--cpus N]
[--memory MiB] [--kernel-args S] [--accel A] [--exec CMD] [--ssh] [--console]`` boots a debug UVM,
runs CMD in it through the agent and exits with CMD's exit code; --ssh gives it an SSH server that
``runuvm ssh VMID [CMD]`` reaches, --console attaches its serial console (shim/runuvm/debugvm.py).
``create-scratch`` makes ext4 scratch disks.
Bad input: exit 1 and one line on stderr naming the problem (JSON with --log-format json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

USAGE_EPILOG = "Each container runs in its own utility VM; its shim daemon's files live in --root/<id>."
ESCAPE_NAME = "Ctrl-]"  # shim.runuvm.debugvm.ESCAPE (not imported here: `runuvm --help` stays quick)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runuvm", description="Run containers in utility VMs.", epilog=USAGE_EPILOG)
    p.add_argument("--debug", action="store_true", help="log at DEBUG level")
    p.add_argument("--root", type=Path, default=None, help="state directory (default /run/uvmshim/runuvm)")
    p.add_argument("--log", type=Path, default=None, help="log file (default stderr)")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    sub = p.add_subparsers(dest="command")
    c = sub.add_parser("create", help="create a container (its UVM boots; the process waits for start)")
    c.add_argument("id")
    c.add_argument("--bundle", "-b", type=Path, default=Path("."))
    c.add_argument("--pid-file", type=Path)
    _add_create_options(c)
    r = sub.add_parser("run", help="create and start a container; relays stdio and exits with its code")
    r.add_argument("id")
    r.add_argument("--bundle", "-b", type=Path, default=Path("."))
    r.add_argument("--detach", "-d", action="store_true")
    r.add_argument("--pid-file", type=Path)
    r.add_argument("--tty", "-t", action="store_true")
    _add_create_options(r)
    for verb, text in (("start", "start a created container"), ("pause", "freeze every process"),
                       ("resume", "thaw a paused container")):
        sub.add_parser(verb, help=text).add_argument("id")
    st = sub.add_parser("state", help="runc's state JSON")
    st.add_argument("id")
    e = sub.add_parser("exec", help="run a process in a running container")
    e.add_argument("id")
    _add_exec_options(e)
    e.add_argument("args", nargs=argparse.REMAINDER)
    k = sub.add_parser("kill", help="signal the container's init (default SIGTERM) or all its processes")
    k.add_argument("id")
    k.add_argument("signal", nargs="?", default="SIGTERM")
    k.add_argument("--all", "-a", action="store_true")
    d = sub.add_parser("delete", help="remove a stopped container (--force: also a running one)")
    d.add_argument("id")
    d.add_argument("--force", "-f", action="store_true")
    ls = sub.add_parser("list", help="containers under --root")
    ls.add_argument("--format", "-f", choices=("table", "json"), default="table")
    ps = sub.add_parser("ps", help="processes of a container")
    ps.add_argument("id")
    ps.add_argument("--format", "-f", choices=("table", "json"), default="table")
    rz = sub.add_parser("resize-tty", help="set a terminal's size")
    rz.add_argument("id")
    rz.add_argument("width", type=int)
    rz.add_argument("height", type=int)
    rz.add_argument("--pid", type=int, default=None, help="an exec'd process (default: the init)")
    u = sub.add_parser("uvm", help="look inside the UVMs of running shims (containerd's and runuvm's)")
    usub = u.add_subparsers(dest="uvm_command", required=True)
    ul = usub.add_parser("list", help="the UVM of every reachable shim")
    ul.add_argument("--format", "-f", choices=("table", "json"), default="table")
    ue = usub.add_parser("exec", help="run a command in a UVM itself (not in its container)")
    ue.add_argument("vm", help="VM id or task id")
    ue.add_argument("args", nargs=argparse.REMAINDER)
    boot = sub.add_parser("boot", help="boot a debug UVM")
    boot.add_argument("--cpus", type=int, default=1)
    boot.add_argument("--memory", type=int, default=256, help="MiB")
    boot.add_argument("--kernel-args", default="")
    boot.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    boot.add_argument("--backend", choices=("qemu", "libvirt"), default="qemu")
    boot.add_argument("--libvirt-uri", default="qemu:///system")
    boot.add_argument("--boot-timeout", type=float, default=60.0)
    boot.add_argument("--exec", dest="exec_cmd", default=None, help="command to run in the UVM (shell words)")
    boot.add_argument("--measure", action="store_true", help="print the boot time")
    boot.add_argument("--share", action="append", default=[], metavar="HOST:GUEST",
                      help="share a host directory over 9p, mounted at GUEST in the UVM (repeatable)")
    boot.add_argument("--mount-scsi", action="append", default=[], metavar="PATH[:ro]",
                      help="attach a disk image on virtio-scsi and mount it in the UVM (repeatable)")
    boot.add_argument("--ssh", action="store_true",
                      help="run an SSH server in the UVM, reachable on a free 127.0.0.1 port with a key made for it "
                           "(see `runuvm ssh`); without --exec the UVM runs until Ctrl-C or SIGTERM")
    boot.add_argument("--console", action="store_true",
                      help=f"attach to the UVM's serial console (a shell); {ESCAPE_NAME} detaches and stops the UVM")
    boot.add_argument("--start", choices=("cold", "template", "auto"), default="cold",
                      help="clone from a template of this image and shape (built first if missing: 'template')")
    boot.add_argument("--count", type=int, default=1, help="boot this many UVMs (measurements)")
    boot.add_argument("--parallel", type=int, default=1, help="at most this many at once")
    ssh = sub.add_parser("ssh", help="run a command (or a shell) over SSH in a UVM booted with `runuvm boot --ssh`")
    ssh.add_argument("vm", help="the VM id `runuvm boot --ssh` printed")
    ssh.add_argument("args", nargs=argparse.REMAINDER, help="a command line, run by the UVM's shell (as ssh does)")
    t = sub.add_parser("template", help="UVM templates that clones start from (build, list, rm)")
    tsub = t.add_subparsers(dest="template_command", required=True)
    tb = tsub.add_parser("build", help="build (or rebuild with --force) the template of a VM shape")
    tb.add_argument("--cpus", type=int, default=1)
    tb.add_argument("--memory", type=int, default=256, help="MiB")
    tb.add_argument("--kernel-args", default="")
    tb.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    tb.add_argument("--config", type=Path, default=None, help="the shim's TOML config: its [uvm] shape, for containers")
    tb.add_argument("--force", action="store_true")
    tl = tsub.add_parser("list", help="templates and whether each is usable")
    tl.add_argument("--format", "-f", choices=("table", "json"), default="table")
    tr = tsub.add_parser("rm", help="remove templates (running clones are not affected)")
    tr.add_argument("keys", nargs="*")
    tr.add_argument("--all", action="store_true")
    scratch = sub.add_parser("create-scratch", help="create a sparse ext4 scratch disk image")
    scratch.add_argument("dest", type=Path)
    scratch.add_argument("--size-gb", type=int, default=20)
    scratch.add_argument("--cache-path", type=Path, default=None)
    return p


def _add_create_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shim-log", type=Path, help="the container's shim daemon logs to this file")
    p.add_argument("--vm-log", type=Path, help="the UVM's log records (lifecycle, QMP, agent, guest) go to this file")
    p.add_argument("--vm-console", type=Path, help="the UVM's serial console is written to this file")
    p.add_argument("--console-socket", type=Path,
                   help="unix socket that receives the master of the process's terminal (process.terminal)")


def _create_options(args: argparse.Namespace) -> Any:
    from shim.runuvm.commands import CreateOptions

    return CreateOptions(shim_log=args.shim_log, vm_log=args.vm_log, vm_console=args.vm_console,
                         console_socket=args.console_socket)


def _create_scratch(args: argparse.Namespace) -> int:
    from uvm.errors import UvmError
    from uvm.scratch import create_scratch

    try:
        s = create_scratch(args.dest, args.size_gb, args.cache_path)
    except UvmError as e:
        print(f"runuvm {e}", file=sys.stderr)
        return 1
    print(f"{s.path}: {s.size_bytes >> 30} GB ext4, {s.allocated_bytes // 1024} KiB on disk"
          f"{' (from cache)' if s.from_cache else ''}")
    return 0


def _boot_config(args: argparse.Namespace) -> Any:
    """The UvmConfig of `runuvm boot`. Raises ValueError naming the bad option."""
    from pydantic import ValidationError

    from schemas.uvm_config import Share, UvmConfig
    from schemas.validation import first_problem

    shares = []
    for i, spec in enumerate(args.share):
        host, sep, guest = spec.partition(":")
        if not sep or not host or not guest.startswith("/"):
            raise ValueError(f"--share {spec!r}: expected HOST_DIR:/GUEST/PATH")
        if not Path(host).is_dir():
            raise ValueError(f"--share {spec!r}: {host} is not a directory")
        shares.append(Share(tag=f"share{i}", host_path=Path(host).resolve()))
    try:
        return UvmConfig(cpus=args.cpus, memory_mib=args.memory, kernel_args=args.kernel_args, accel=args.accel,
                         boot_timeout=args.boot_timeout, backend=args.backend, libvirt_uri=args.libvirt_uri,
                         shares=shares, start=args.start, ssh_port=0 if args.ssh else None,
                         console_socket=args.console)
    except ValidationError as e:
        raise ValueError(first_problem(e, whole="")) from None


@dataclass
class BootRun:
    """What the signal handler of `runuvm boot` needs to know."""

    count: int
    serving: int = 0  # UVMs up and waiting for the user to stop them (--ssh without --exec)
    stop_signal: int | None = None
    serving_at_stop: bool = False
    exec_argv: list[str] | None = None  # --exec, split into words
    live: set[Any] = field(default_factory=set)  # the UVMs started and not closed yet


async def _boot_one(args: argparse.Namespace, n: int, run: BootRun) -> tuple[int, float]:
    """Boot one UVM, mount what was asked, give SSH, run --exec or attach the console, or serve until
    stopped; (exit code, seconds to agent ready). Stopping (also by Ctrl-C or SIGTERM, which cancel
    this) removes the SSH access and shuts the UVM down gracefully."""
    from shim.runuvm import debugvm
    from shim.runuvm.commands import RunuvmError
    from uvm.errors import UvmError
    from uvm.lifecycle import VmState
    from uvm.vm import UtilityVM

    vm = UtilityVM(_boot_config(args))
    tag = f"[{n}] " if args.count > 1 else ""
    access: debugvm.SshAccess | None = None
    claim: debugvm.BootClaim | None = None
    try:
        claim = debugvm.claim_boot(args.root or _default_root(), vm)
        run.live.add(vm)
        await vm.start()
        boot = vm.boot_seconds or 0.0
        if args.measure:
            how = "cloned from a template" if vm.started_from == "template" else "cold boot"
            print(f"{tag}boot: {boot:.3f}s to agent ready ({vm.id}, {how})", file=sys.stderr)
            for line in _boot_phases(vm):
                print(f"{tag}  {line}", file=sys.stderr)
        for i, spec in enumerate(args.share):
            guest = spec.partition(":")[2]
            script = (f"modprobe -a 9pnet_virtio 9p && mkdir -p {shlex.quote(guest)} && mount -t 9p -o "
                      f"trans=virtio,version=9p2000.L,msize=262144 share{i} {shlex.quote(guest)}")
            res = await vm.run(["sh", "-c", script])
            if res.exit_status != 0:
                raise UvmError(f"--share {spec}: mount failed: {res.stderr.decode(errors='replace').strip()}")
        for i, spec in enumerate(args.mount_scsi):
            path, ro = (spec[:-3], True) if spec.endswith(":ro") else (spec, False)
            disk = await vm.add_scsi_disk(path, f"/mnt/scsi{i}", readonly=ro)
            print(f"{tag}scsi: {path} -> {disk.guest_path} ({disk.device})", file=sys.stderr)
        if args.ssh:
            access = await debugvm.start_ssh(vm, claim)
            print(f"{tag}{access.instructions()}", file=sys.stderr, flush=True)
        code = 0
        if run.exec_argv:
            res = await vm.run(run.exec_argv)
            sys.stdout.buffer.write(res.stdout)
            sys.stderr.buffer.write(res.stderr)
            code = res.exit_status if res.exit_status is not None else 128 + (res.signal or 0)
        elif args.console:
            code = await debugvm.attach_console(vm)
        elif args.ssh:
            print(f"{tag}VM {vm.id} runs until Ctrl-C or SIGTERM", file=sys.stderr, flush=True)
            run.serving += 1
            try:
                # A signal cancels this. The guest powering off ends it too (a VM that died raises).
                ended = await vm.wait()
                print(f"{tag}VM {vm.id} stopped ({ended.reason})", file=sys.stderr)
                return 0, boot
            finally:
                run.serving -= 1
        await vm.shutdown()
        await vm.wait_timeout(30)
        return code, boot
    except (UvmError, RunuvmError) as e:
        print(f"runuvm boot: {tag}{e}", file=sys.stderr)
        return 1, 0.0
    finally:
        if access is not None:
            access.remove()
        if vm.state is VmState.RUNNING:  # stopped by a signal or a failure: still a graceful stop
            with contextlib.suppress(UvmError):
                await vm.shutdown()
                await vm.wait_timeout(30)
        await vm.close()
        run.live.discard(vm)
        if claim is not None:
            claim.remove()


def _boot_phases(vm: Any) -> list[str]:
    """--measure's detail: the host's two steps, and for a cold boot the guest's, by its own uptime
    (which starts when its kernel does, after QEMU's own start)."""
    if vm.launch_seconds is None or vm.boot_seconds is None:
        return []
    waited = vm.boot_seconds - vm.launch_seconds
    lines = [f"host: {vm.config.backend} up {vm.launch_seconds:.3f}s, then the agent's hello after {waited:.3f}s"]
    hello = vm.hello
    if hello is not None and hello.boot is not None and vm.started_from == "cold":
        b = hello.boot
        before = waited - hello.uptime  # the host's clock against the guest's
        lines.append(f"guest (by its uptime): kernel {b.init:.2f}s, /init {b.exec - b.init:.2f}s, python3 and the "
                     f"agent's import {b.agent - b.exec:.2f}s, agent to hello {hello.uptime - b.agent:.2f}s; "
                     f"before its clock started (kernel load, early boot) {before:.2f}s")
    return lines


async def _force_off(vm: Any) -> None:
    from uvm.errors import UvmError

    with contextlib.suppress(UvmError):
        await vm.terminate()


def _default_root() -> Path:
    from shim.runuvm.commands import default_root

    return default_root()


async def _boot(args: argparse.Namespace) -> int:
    """`--count N --parallel P`: N UVMs, at most P booting at once; a summary of the boot times.

    SIGINT, SIGTERM and SIGHUP cancel the boots (each UVM is torn down, its SSH access removed); the
    exit code is then 0 if every UVM was up serving (--ssh: the way to stop it), else 128 + the signal."""
    try:
        _boot_config(args)
    except ValueError as e:
        print(f"runuvm boot: {e}", file=sys.stderr)
        return 2
    if args.count < 1 or args.parallel < 1:
        print("runuvm boot: --count and --parallel must be at least 1", file=sys.stderr)
        return 2
    if args.console and (args.count > 1 or args.exec_cmd):
        print("runuvm boot: --console attaches one UVM's console: not with --count or --exec", file=sys.stderr)
        return 2
    run = BootRun(args.count)
    if args.exec_cmd is not None:
        try:
            run.exec_argv = shlex.split(args.exec_cmd)
        except ValueError as e:
            print(f"runuvm boot: --exec {args.exec_cmd!r}: {e}", file=sys.stderr)
            return 2
        if not run.exec_argv:
            print("runuvm boot: --exec: no command", file=sys.stderr)
            return 2
    gate = asyncio.Semaphore(args.parallel)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    forcing: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        if run.stop_signal is None:
            run.stop_signal, run.serving_at_stop = signum, run.serving == run.count
            main.cancel()
            return
        # Again while the UVMs shut down gracefully: force them off, but let the teardown finish
        # (cancelling it too would leave QEMU, its run directory and the boot records behind).
        print("runuvm boot: stopping the UVMs now", file=sys.stderr, flush=True)
        forcing.extend(loop.create_task(_force_off(vm)) for vm in list(run.live))

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, on_signal, signum)

    async def gated(n: int) -> tuple[int, float]:
        async with gate:
            return await _boot_one(args, n, run)

    try:
        results = await asyncio.gather(*(gated(n) for n in range(args.count)))
    except asyncio.CancelledError:
        if run.stop_signal is None:
            raise
        main.uncancel()  # our own signal handler's cancellation, now handled: every UVM is down
        return 0 if run.serving_at_stop else 128 + run.stop_signal
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    if args.count > 1:
        times = sorted(t for code, t in results if t)
        failed = sum(1 for code, t in results if not t)
        if times:
            print(f"boot x{args.count} (parallel {args.parallel}): median {times[len(times) // 2]:.3f}s, "
                  f"min {times[0]:.3f}s, max {times[-1]:.3f}s, {failed} failed", file=sys.stderr)
    return max(code for code, _ in results)


def _template_config(args: argparse.Namespace) -> Any:
    from schemas.uvm_config import Share, UvmConfig

    if args.config is None:
        return UvmConfig(cpus=args.cpus, memory_mib=args.memory, kernel_args=args.kernel_args, accel=args.accel)
    from schemas.shim_options import load_options
    from schemas.uvm_config import NEW_NETNS
    from shim.containerd.pod import POD_TAG

    # The shape the shim gives a pod's UVM: its config plus the pod share and a NIC (a container's network).
    return load_options(args.config).uvm_config(shares=[Share(tag=POD_TAG, host_path=Path("/"))],
                                                network_namespace=NEW_NETNS)


async def _template(args: argparse.Namespace) -> int:
    """`runuvm template build|list|rm`."""
    from schemas.uvm_config import UvmConfig
    from uvm import template, template_builder
    from uvm.errors import UvmError

    if args.template_command == "build":
        try:
            config = _template_config(args)
            t = await template_builder.build(config, force=args.force)
        except (UvmError, ValueError) as e:
            print(f"runuvm template build: {e}", file=sys.stderr)
            return 1
        print(f"{t.key}: {t.path} (memory {t.memory}, built in {t.meta.build_seconds:.1f}s)")
        return 0
    rows = template.list_templates(UvmConfig())
    if args.template_command == "list":
        if args.format == "json":
            print(json.dumps(rows, indent=1))
        else:
            print(f"{'KEY':<22}{'VALID':<7}{'CPUS':<6}{'MEMORY':<8}PATH / PROBLEM")
            for r in rows:
                print(f"{r['key']:<22}{'yes' if r['valid'] else 'no':<7}{r.get('cpus') or '-'!s:<6}"
                      f"{r.get('memory_mib') or '-'!s:<8}{r['path'] if r['valid'] else r['problem']}")
        return 0
    known = {r["key"]: Path(r["path"]) for r in rows}
    if not args.all and not args.keys:
        print("runuvm template rm: name templates (KEY...) or --all", file=sys.stderr)
        return 2
    unknown = [k for k in args.keys if k not in known]
    if unknown:
        print(f"runuvm template rm: no template {unknown[0]}", file=sys.stderr)
        return 1
    for key in (known if args.all else args.keys):
        template.delete(known[key])
        print(f"removed {key}")
    return 0


CONTAINER_COMMANDS = ("create", "run", "start", "pause", "resume", "state", "exec", "kill", "delete", "list", "ps",
                      "resize-tty", "uvm")


def _command(words: list[str]) -> list[str]:
    """A trailing command given as `-- ARGS...` (argparse keeps the `--` in a REMAINDER)."""
    return words[1:] if words[:1] == ["--"] else words


EXEC_VALUE_OPTIONS = ("--process", "-p", "--pid-file", "--console-socket")


def _add_exec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--process", "-p", type=Path, help="OCI process JSON")
    p.add_argument("--tty", "-t", action="store_true")
    p.add_argument("--detach", "-d", action="store_true")
    p.add_argument("--pid-file", type=Path)
    p.add_argument("--console-socket", type=Path, help="with -t -d: unix socket that receives the terminal's master")


def _exec_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """exec's options may also follow the id (`exec ID -d --pid-file F -- CMD`): argparse's REMAINDER
    took them; parse the leading options out of it, up to `--` or the first word of the command."""
    words, lead = list(args.args), []
    while words and words[0].startswith("-") and words[0] != "--":
        lead.append(words.pop(0))
        if lead[-1] in EXEC_VALUE_OPTIONS and words:
            lead.append(words.pop(0))
    opts = argparse.ArgumentParser(prog=f"{parser.prog} exec", add_help=False)
    _add_exec_options(opts)
    given = opts.parse_args(lead)
    args.process = given.process or args.process
    args.pid_file = given.pid_file or args.pid_file
    args.console_socket = given.console_socket or args.console_socket
    args.tty, args.detach = args.tty or given.tty, args.detach or given.detach
    args.args = _command(words)


async def _container_command(args: argparse.Namespace) -> int:
    from shim.runuvm.commands import Runuvm, default_root, parse_signal

    rt = Runuvm(args.root or default_root(), debug=args.debug)
    cmd = args.command
    if cmd == "create":
        await rt.create(args.id, args.bundle, args.pid_file, options=_create_options(args))
    elif cmd == "run":
        return await rt.run(args.id, args.bundle, args.detach, args.pid_file, args.tty, _create_options(args))
    elif cmd == "start":
        await rt.start(args.id)
    elif cmd == "pause":
        await rt.pause(args.id)
    elif cmd == "resume":
        await rt.resume(args.id)
    elif cmd == "state":
        print(json.dumps(await rt.state(args.id), indent=2))
    elif cmd == "exec":
        return await rt.exec(args.id, args.args, args.process, args.tty, args.detach, args.pid_file,
                             args.console_socket)
    elif cmd == "kill":
        await rt.kill(args.id, parse_signal(args.signal), args.all)
    elif cmd == "delete":
        await rt.delete(args.id, args.force)
    elif cmd == "list":
        states = await rt.list_all()
        if args.format == "json":
            print(json.dumps(states))
        else:
            print(f"{'ID':<20} {'PID':<8} {'STATUS':<10} {'BUNDLE':<40} {'CREATED':<32} OWNER")
            for s in states:
                print(f"{s['id']:<20} {s['pid']:<8} {s['status']:<10} {s['bundle']:<40} {s['created']:<32} {s['owner']}")
    elif cmd == "ps":
        pids = await rt.ps(args.id)
        print(json.dumps(pids) if args.format == "json" else "\n".join(["PID", *map(str, pids)]))
    elif cmd == "uvm" and args.uvm_command == "list":
        vms = await rt.uvm_list()
        if args.format == "json":
            print(json.dumps(vms))
        else:
            print(f"{'VM':<28} {'STATE':<9} {'PID':<8} {'BOOT':<7} {'TASK':<24} ADDRESS")
            for v in vms:
                print(f"{v['vm']:<28} {v['state']:<9} {v['pid']:<8} {v['boot_seconds']:<7} "
                      f"{v['namespace'] + '/' + v['task']:<24} {v['address']}")
    elif cmd == "uvm":
        code, out, err = await rt.uvm_exec(args.vm, _command(args.args))
        sys.stdout.buffer.write(out)
        sys.stderr.buffer.write(err)
        return code
    elif cmd == "resize-tty":
        await rt.resize(args.id, args.width, args.height, await rt.exec_id_of(args.id, args.pid))
    return 0


def _report(args: argparse.Namespace, message: str) -> None:
    """One line naming the problem: text, or a JSON record like runc's --log-format json."""
    if args.log_format == "json":
        line = json.dumps({"level": "error", "msg": message, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    else:
        line = f"runuvm: {message}"
    print(line, file=sys.stderr)
    if args.log is not None:
        with open(args.log, "a") as f:
            print(line, file=f)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "exec":
        _exec_options(parser, args)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, filename=args.log,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in CONTAINER_COMMANDS:
        from shim.runuvm.commands import RunuvmError

        try:
            return asyncio.run(_container_command(args))
        except RunuvmError as e:
            _report(args, str(e))
            return 1
        except (OSError, ValueError, TypeError) as e:  # a file, a path or a value the command could not use
            _report(args, f"{args.command}: {e}")
            return 1
    if args.command == "boot":
        return asyncio.run(_boot(args))
    if args.command == "template":
        return asyncio.run(_template(args))
    if args.command == "ssh":
        from shim.runuvm.commands import RunuvmError, default_root
        from shim.runuvm.debugvm import ssh_command

        try:
            return ssh_command(args.root or default_root(), args.vm, _command(args.args))
        except RunuvmError as e:
            _report(args, str(e))
            return 1
        except KeyboardInterrupt:  # Ctrl-C while a command runs (a shell gets it as a key instead)
            return 130
    if args.command == "create-scratch":
        return _create_scratch(args)
    parser.print_help()
    return 0 if args.command is None else 2


if __name__ == "__main__":
    sys.exit(main())
