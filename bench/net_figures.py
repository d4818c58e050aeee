"""Network figures for `make bench` (`--only net`), each against a floor measured in the same run.

The floor is a raw QEMU guest of the same kernel and image, no agent and no container: the image's
initramfs with /init ending in a busybox shell script that loads virtio_net, configures eth0 as the
guest agent would, and serves; its NIC is on a tap beside the same veth with the same tc redirects
(uvm/network.py), so what is left between the two is the project's own overhead.

* TCP throughput, 256 MiB each way: host -> guest (busybox nc listening, output to /dev/null) and
  guest -> host (busybox nc sending /dev/zero), the container in the UVM against the raw guest:
  target >= 0.8x; and against a process in the namespace itself on the host (what runc gives: a veth
  at host speed), for reference.
* HTTP round trip: 200 small GETs from the host to busybox httpd, each on a new connection: <= 1.2x.
* Start with a network against without: a UVM to a running container, cold, with the pod's namespace
  taken over against no network at all, interleaved: <= 1.1x.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from measure import median  # bench/ (the bench script's directory) is on sys.path

from schemas import oci
from schemas.uvm_config import Share, UvmConfig
from tests.netfixtures import PodNet, pod_network
from uvm import builder, network
from uvm.container import Container, Rootfs
from uvm.vm import UtilityVM

MIB = 1 << 20
CONTROL_PORT = 5002  # the raw guest runs what it is sent there (it has no agent to ask)
TRANSFER = 256 * MIB
GETS = 200
NC_PORT = 5001
HTTP_PORT = 8080
RawArgv = Callable[[builder.LaunchSpec, Path, Path, bool], list[str]]  # bench.py's raw_argv
SERVE = (f"mkdir -p /tmp/www && echo ok > /tmp/www/index.html && httpd -p {HTTP_PORT} -h /tmp/www && "
         f"while true; do nc -l -p {NC_PORT} > /dev/null; done")


def raw_guest_initrd(tmp: Path, spec: builder.LaunchSpec, pod: PodNet) -> Path:
    """The image's initramfs with /init switching to a busybox script instead of the agent."""
    import importlib.util

    repo = Path(__file__).resolve().parent.parent
    mod_spec = importlib.util.spec_from_file_location("image_build", repo / "images" / "build.py")
    assert mod_spec and mod_spec.loader
    image_build = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(image_build)
    script = (f"modprobe virtio_net; n=0; while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 500 ]; do n=$((n+1)); "
              f"sleep 0.01; done; ip link set dev eth0 mtu 1400 up; ip addr add {pod.address}/24 dev eth0; "
              f"ip route add default via {pod.gateway} dev eth0; "
              f"(while true; do nc -l -p {CONTROL_PORT} > /tmp/cmd; sh /tmp/cmd; done) & echo READY; {SERVE}")
    init = (repo / "images" / "init").read_text()
    start = init.index("exec switch_root")
    end = init.index("\n", start)
    init = init[:start] + f"exec switch_root /newroot /bin/sh -c '{script}'" + init[end:]
    c = image_build.Cpio()
    c.file("init", init.encode(), 0o755)
    path = tmp / "rawnet.cpio"
    path.write_bytes(spec.initrd.read_bytes() + c.finish())
    return path


@contextlib.contextmanager
def raw_guest(tmp: Path, spec: builder.LaunchSpec, pod: PodNet, raw_argv: RawArgv) -> Iterator[None]:
    """The floor: a raw QEMU guest whose NIC stands in for the pod's veth, serving until the block ends."""
    config = network.read_config(pod.fd)
    attachments = network.attach(pod.fd, config.interfaces, queues=1, vhost=spec.accel == "kvm")
    try:
        nic = builder.Nic(id="nic0", mac=attachments[0].mac, tap_fds=tuple(attachments[0].tap_fds),
                          vhost_fds=tuple(attachments[0].vhost_fds))
        initrd = raw_guest_initrd(tmp, spec, pod)
        argv = raw_argv(dataclasses.replace(spec, nics=(nic,)), initrd, tmp, True)  # the console on its stdout
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                pass_fds=nic.tap_fds + nic.vhost_fds, preexec_fn=network.enter_netns_preexec(pod.fd))
        try:
            assert proc.stdout is not None
            seen = b""
            while b"READY" not in seen:
                chunk = proc.stdout.read1(4096)  # type: ignore[attr-defined]
                if not chunk:
                    raise RuntimeError(f"the raw guest ended before READY: {seen[-300:]!r}")
                seen += chunk
            threading.Thread(target=lambda: proc.stdout.read() if proc.stdout else b"", daemon=True).start()
            wait_until(lambda: http_get(pod.address) == b"ok\n", 60, "the raw guest's httpd")
            yield
        finally:
            proc.kill()
            proc.wait()
    finally:
        network.detach(pod.fd, attachments)


def wait_until(ok: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if ok():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"never saw {what}")
        time.sleep(0.2)


def http_get(address: str) -> bytes:
    with urllib.request.urlopen(f"http://{address}:{HTTP_PORT}/", timeout=30) as r:
        return bytes(r.read())


def send_to(address: str) -> float:
    """MB/s of TRANSFER bytes sent to address's nc listener (until it has read them all and closed)."""
    chunk = b"\0" * MIB
    deadline = time.monotonic() + 30
    while True:  # the listener's loop starts a new `nc -l` after each transfer: wait for it to listen
        try:
            s = socket.create_connection((address, NC_PORT), timeout=120)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with s:
        t0 = time.monotonic()
        for _ in range(TRANSFER // MIB):
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
        return TRANSFER / MIB / (time.monotonic() - t0)


def receive_from(start_sender: Callable[[int], None], bind: str) -> float:
    """MB/s of TRANSFER bytes a sender started by start_sender(port) sends to a listener on bind."""
    with socket.socket() as ls:
        ls.bind((bind, 0))
        ls.listen(1)
        ls.settimeout(120)
        port = ls.getsockname()[1]
        sender = threading.Thread(target=start_sender, args=(port,), daemon=True)
        sender.start()
        conn, _ = ls.accept()
        with conn:
            got = 0
            t0 = time.monotonic()
            while data := conn.recv(1 << 20):
                got += len(data)
            took = time.monotonic() - t0
        sender.join(timeout=120)
    if got != TRANSFER:
        raise RuntimeError(f"received {got} bytes, not {TRANSFER}")
    return TRANSFER / MIB / took


def http_rtt(address: str) -> float:
    """Median seconds of GETS small GETs, each on a new connection."""
    times = []
    for _ in range(GETS):
        t0 = time.monotonic()
        assert http_get(address) == b"ok\n"
        times.append(time.monotonic() - t0)
    return median(times)


def in_netns_sender(pod: PodNet) -> Callable[[int], None]:
    """A sender in the pod's namespace on the host itself (what runc's container would be)."""
    def send(port: int) -> None:
        subprocess.run(["ip", "netns", "exec", pod.name, "sh", "-c",
                        f"head -c {TRANSFER} /dev/zero | busybox nc {pod.gateway} {port}"], check=True, timeout=300)
    return send


def spec_in_the_uvm(*args: str) -> oci.Spec:
    spec = oci.default_spec(list(args), env=["PATH=/bin"])
    assert spec.linux is not None
    spec.linux["namespaces"] = [ns for ns in spec.linux["namespaces"] if ns["type"] != "network"]
    return spec


async def uvm_server(vm: UtilityVM) -> Container:
    c = await vm.create_container("netserve", spec_in_the_uvm("sh", "-c", SERVE), Rootfs(share="shares", path="busybox"))
    await c.start()
    return c


async def uvm_sender(vm: UtilityVM, host: str, port: int) -> None:
    c = await vm.create_container(f"netsend{port}", spec_in_the_uvm(
        "sh", "-c", f"head -c {TRANSFER} /dev/zero | nc {host} {port}"), Rootfs(share="shares", path="busybox"))
    await c.start()
    if (await c.wait_timeout(300)).exit_code != 0:
        raise RuntimeError("the container's sender failed")
    await c.close()


async def start_to_container(config: Callable[..., UvmConfig], pod_path: str | None) -> float:
    t0 = time.monotonic()
    async with UtilityVM(config(network_namespace=pod_path)) as vm:
        c = await vm.create_container("s", spec_in_the_uvm("true"), Rootfs(share="shares", path="busybox"))
        await c.start()
        took = time.monotonic() - t0
        await c.wait_timeout(120)
        await c.close()
    return took


def figures(tmp: Path, run_dir: Path, state_dir: Path, rootfs: Path, raw_argv: RawArgv, n: int) -> dict[str, Any]:
    def config(**kw: Any) -> UvmConfig:
        return UvmConfig(run_dir=run_dir, state_dir=state_dir, shares=[Share(tag="shares", host_path=rootfs.parent)],
                         **kw)

    spec = builder.build(config())
    out: dict[str, Any] = {}
    with pod_network(inside="eth0") as pod:
        loop = asyncio.new_event_loop()
        try:
            vm = UtilityVM(config(network_namespace=pod.path))
            loop.run_until_complete(vm.start())
            try:
                server = loop.run_until_complete(uvm_server(vm))
                wait_until(lambda: http_get(pod.address) == b"ok\n", 60, "the container's httpd")
                uvm_in = [send_to(pod.address) for _ in range(3)]
                uvm_out = [receive_from(lambda port: loop.run_until_complete(uvm_sender(vm, pod.gateway, port)),
                                        pod.gateway)]
                uvm_rtt = http_rtt(pod.address)
                loop.run_until_complete(server.terminate())
                loop.run_until_complete(server.wait_timeout(60))
                loop.run_until_complete(server.close())
            finally:
                loop.run_until_complete(vm.close())
        finally:
            loop.close()
        with raw_guest(tmp, spec, pod, raw_argv):
            raw_in = [send_to(pod.address) for _ in range(3)]
            raw_out = [receive_from(lambda port: raw_send(pod, port), pod.gateway)]
            raw_rtt = http_rtt(pod.address)
        host_out = receive_from(in_netns_sender(pod), pod.gateway)
    out["tput_in"] = {"uvm": median(uvm_in), "raw": median(raw_in), "ratio": median(uvm_in) / median(raw_in)}
    out["tput_out"] = {"uvm": median(uvm_out), "raw": median(raw_out), "ratio": median(uvm_out) / median(raw_out),
                       "veth_on_host": host_out}
    out["http_rtt"] = {"uvm": uvm_rtt, "raw": raw_rtt, "ratio": uvm_rtt / raw_rtt}
    starts: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(n):
        with pod_network(inside="eth0") as pod:
            starts["with"].append(asyncio.run(start_to_container(config, pod.path)))
        starts["without"].append(asyncio.run(start_to_container(config, None)))
    w, wo = median(starts["with"]), median(starts["without"])
    out["start"] = {"with": w, "without": wo, "ratio": w / wo, "runs": starts}
    return out


def raw_send(pod: PodNet, port: int) -> None:
    """Tell the raw guest (through its control port) to send TRANSFER bytes to the host's port."""
    with socket.create_connection((pod.address, CONTROL_PORT), timeout=60) as s:
        s.sendall(f"head -c {TRANSFER} /dev/zero | nc {pod.gateway} {port}\n".encode())


def print_figures(f: dict[str, Any]) -> None:
    t_in, t_out, rtt, st = f["tput_in"], f["tput_out"], f["http_rtt"], f["start"]
    print(f"network: TCP host -> container {t_in['uvm']:.1f} MB/s, raw guest {t_in['raw']:.1f} MB/s "
          f"({t_in['ratio']:.2f}x, target >= 0.8x)")
    print(f"network: TCP container -> host {t_out['uvm']:.1f} MB/s, raw guest {t_out['raw']:.1f} MB/s "
          f"({t_out['ratio']:.2f}x, target >= 0.8x); a veth on the host (runc) {t_out['veth_on_host']:.1f} MB/s")
    print(f"network: HTTP GET round trip {rtt['uvm'] * 1e3:.2f} ms, raw guest {rtt['raw'] * 1e3:.2f} ms "
          f"({rtt['ratio']:.2f}x, target <= 1.2x)")
    print(f"network: UVM start to a running container with the pod's network {st['with']:.2f}s, without "
          f"{st['without']:.2f}s ({st['ratio']:.2f}x, target <= 1.1x)")

