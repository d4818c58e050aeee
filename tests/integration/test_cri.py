"""Kubernetes pods through containerd's real CRI plugin, as the kubelet drives it (no kubelet): the CRI
client of tests/cri against a private containerd (tests/cri/env.py), for each runtime handler in
HANDLERS. With runc, this proves the harness itself -- the network, the images, the log format, the
streaming server -- so that the same tests can then judge another handler (our shim's "uvm").

Every test asks through CRI what a user of Kubernetes would see: the pod's IP, pages served and
fetched, command output and exit codes, log files, stats, and what is left on the host afterwards.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shim.containerd_env import mounts_under
from tests.cri import api_pb2 as api
from tests.cri.client import CriClient, CriError, stream
from tests.cri.env import CriContainerd, cgroup_dirs, container_config
from tests.integration.ctr import qemu_processes, shim_processes
from tests.netfixtures import CNI_BIN, fetch

_MISSING = [tool for tool in ("containerd", "ctr", "runc") if shutil.which(tool) is None] + [
    f"{CNI_BIN}/{plugin}" for plugin in ("bridge", "host-local", "loopback") if not os.path.exists(f"{CNI_BIN}/{plugin}")]
if os.geteuid() != 0:
    pytest.skip("containerd's CRI needs root", allow_module_level=True)
if _MISSING:
    pytest.skip(f"not installed: {_MISSING} (apt-get install containerd runc containernetworking-plugins)",
                allow_module_level=True)

# The runtime handlers (containerd CRI runtime names) every test runs with.
HANDLERS = ["runc", "uvm"]

PAGE = b"hello from the pod\n"
HTTPD = ["sh", "-c", f"mkdir -p /www && printf '{PAGE.decode().strip()}\\n' > /www/index.html && "
         "exec httpd -f -p 8080 -h /www"]
DNS = api.DNSConfig(servers=["10.96.0.10"], searches=["uvmtest.svc.cluster.local"], options=["ndots:2"])
# A line of CRI's container log: "<RFC3339Nano time> <stream> <F(ull)|P(artial)> <text>".
LOG_LINE = re.compile(r"^(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d)) (?P<stream>stdout|stderr) "
                      r"(?P<tag>[FP]) (?P<text>.*)$")


@dataclass
class Pod:
    """A running pod of the module: its CRI id and config, the handler, its IP, and its two containers."""

    id: str
    config: api.PodSandboxConfig
    handler: str
    ip: str
    httpd: str
    waiter: str


@pytest.fixture(scope="module")
def env(suite_dir: Path, request: pytest.FixtureRequest) -> Iterator[CriContainerd]:
    """A containerd of the module's own with CRI on; afterwards nothing of it may be left on the host."""
    cri_env = CriContainerd()
    with pytest.MonkeyPatch.context() as mp:
        # containerd passes its environment to the shims: keep the uvm handler's VMs in the suite's run dir.
        mp.setenv("UVMSHIM_RUN_DIR", str(suite_dir / "run"))
        mp.setenv("UVMSHIM_CONFIG", str(cri_env.shim_config))
        if "uvm" in HANDLERS:
            mp.setenv("UVMSHIM_IMAGE_DIR", str(request.getfixturevalue("image_dir")))
        with cri_env:
            yield cri_env
    assert not cri_env.base_dir.exists(), f"{cri_env.base_dir} left behind"
    assert not Path(f"/sys/class/net/{cri_env.bridge}").exists(), f"bridge {cri_env.bridge} left behind"
    assert not cgroup_dirs(cri_env.cgroup_parent), f"cgroups left behind: {cgroup_dirs(cri_env.cgroup_parent)}"


@pytest.fixture(scope="module", params=HANDLERS)
def pod(env: CriContainerd, request: pytest.FixtureRequest) -> Iterator[Pod]:
    """A pod of the handler with an httpd on port 8080 and a container that waits, both running."""
    handler: str = request.param
    config = env.pod_config(f"web-{handler}", dns=DNS)
    pod_id = env.cri.run_pod(config, handler).pod_sandbox_id
    try:
        httpd = start(env.cri, pod_id, config, container_config("httpd", HTTPD, pod=config))
        waiter = start(env.cri, pod_id, config, container_config("waiter", ["sleep", "3600"], pod=config))
        ip = env.cri.pod_status(pod_id).status.network.ip
        yield Pod(id=pod_id, config=config, handler=handler, ip=ip, httpd=httpd, waiter=waiter)
    finally:
        env.cri.stop_pod(pod_id)
        env.cri.remove_pod(pod_id)


def start(cri: CriClient, pod_id: str, pod_config: api.PodSandboxConfig, config: api.ContainerConfig) -> str:
    container_id = cri.create_container(pod_id, config, pod_config).container_id
    cri.start_container(container_id)
    return container_id


@contextlib.contextmanager
def running(cri: CriClient, pod: Pod, config: api.ContainerConfig) -> Iterator[str]:
    """A container of the pod for one test, removed afterwards (stopped first if need be)."""
    container_id = start(cri, pod.id, pod.config, config)
    try:
        yield container_id
    finally:
        cri.remove_container(container_id)


def wait_exited(cri: CriClient, container_id: str, timeout: float = 30) -> api.ContainerStatus:
    """The container's status once CRI reports it EXITED (CRI 1.6 has no event stream to wait on)."""
    deadline = time.monotonic() + timeout
    while (status := cri.container_status(container_id).status).state != api.CONTAINER_EXITED:
        assert time.monotonic() < deadline, f"container {container_id} still {api.ContainerState.Name(status.state)}"
        time.sleep(0.05)
    return status


def log_lines(pod: Pod, config: api.ContainerConfig) -> list[re.Match[str]]:
    path = Path(pod.config.log_directory) / config.log_path
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines()
    parsed = [LOG_LINE.match(line) for line in lines]
    assert all(parsed), f"{path}: not CRI's log format: {lines}"
    return [m for m in parsed if m]


def wait_logged(pod: Pod, config: api.ContainerConfig, text: str, timeout: float = 30) -> list[re.Match[str]]:
    """The container's log lines once one of them says ``text`` (the container's own ready signal)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = log_lines(pod, config)
        if any(m["text"] == text for m in lines):
            return lines
        assert time.monotonic() < deadline, f"{config.metadata.name} never logged {text!r}: {[m[0] for m in lines]}"
        time.sleep(0.05)


# --- the pod and its network -------------------------------------------------------------------------


def test_pod_is_ready_with_an_address_in_the_subnet(env: CriContainerd, pod: Pod) -> None:
    status = env.cri.pod_status(pod.id).status
    assert status.state == api.SANDBOX_READY
    assert status.runtime_handler == pod.handler
    assert pod.ip.startswith(f"{env.subnet}.") and pod.ip != env.gateway
    containers = {c.metadata.name: c.state for c in env.cri.list_containers(pod.id).containers}
    assert containers == {"httpd": api.CONTAINER_RUNNING, "waiter": api.CONTAINER_RUNNING}


def test_host_fetches_a_page_from_the_pod(pod: Pod) -> None:
    assert fetch(f"http://{pod.ip}:8080/index.html", patience=30) == PAGE


def test_containers_of_a_pod_share_localhost(env: CriContainerd, pod: Pod) -> None:
    fetch(f"http://{pod.ip}:8080/index.html", patience=30)  # httpd is serving
    res = env.cri.exec_sync(pod.waiter, ["wget", "-q", "-O", "-", "http://127.0.0.1:8080/index.html"], exec_timeout=10)
    assert (res.exit_code, res.stdout, res.stderr) == (0, PAGE, b"")


def test_containers_of_a_pod_see_one_kernel_ipc_and_uts(env: CriContainerd, pod: Pod) -> None:
    probe = ["sh", "-c", "cat /proc/sys/kernel/random/boot_id; readlink /proc/self/ns/ipc; readlink /proc/self/ns/uts"]
    seen = [env.cri.exec_sync(cid, probe).stdout for cid in (pod.httpd, pod.waiter)]
    assert seen[0] == seen[1] and len(seen[0].splitlines()) == 3, seen


def test_two_pods_reach_each_other(env: CriContainerd, pod: Pod) -> None:
    config = env.pod_config(f"peer-{pod.handler}")
    peer = env.cri.run_pod(config, pod.handler).pod_sandbox_id
    try:
        client = start(env.cri, peer, config, container_config("client", ["sleep", "3600"], pod=config))
        fetch(f"http://{pod.ip}:8080/index.html", patience=30)  # httpd is serving
        res = env.cri.exec_sync(client, ["wget", "-q", "-O", "-", f"http://{pod.ip}:8080/index.html"], exec_timeout=20)
        assert (res.exit_code, res.stdout) == (0, PAGE), res.stderr
    finally:
        env.cri.stop_pod(peer)
        env.cri.remove_pod(peer)


def test_dns_config_and_hostname_reach_the_container(env: CriContainerd, pod: Pod) -> None:
    resolv = env.cri.exec_sync(pod.waiter, ["cat", "/etc/resolv.conf"]).stdout.decode()
    assert "nameserver 10.96.0.10" in resolv.splitlines()
    assert "search uvmtest.svc.cluster.local" in resolv.splitlines()
    assert "options ndots:2" in resolv.splitlines()
    assert env.cri.exec_sync(pod.waiter, ["hostname"]).stdout == f"{pod.config.hostname}\n".encode()


# --- exec ------------------------------------------------------------------------------------------


def test_exec_sync_returns_output_and_exit_code(env: CriContainerd, pod: Pod) -> None:
    res = env.cri.exec_sync(pod.waiter, ["sh", "-c", "echo out; echo err >&2; exit 3"], exec_timeout=10)
    assert (res.stdout, res.stderr, res.exit_code) == (b"out\n", b"err\n", 3)


def test_exec_streams_stdin_stdout_stderr_and_the_exit_code(env: CriContainerd, pod: Pod) -> None:
    # v4.channel.k8s.io cannot end stdin without losing the rest of the session (see tests/cri/client.py):
    # the command stops reading by itself after one line, where `cat` would wait for EOF forever.
    url = env.cri.exec_url(pod.waiter, ["sh", "-c", "head -n 1; echo done >&2; exit 5"], stdin=True)
    assert stream(url, stdin=b"hi\n") == (b"hi\n", b"done\n", 5)


def test_exec_without_stdin_succeeds_with_zero(env: CriContainerd, pod: Pod) -> None:
    url = env.cri.exec_url(pod.waiter, ["sh", "-c", "echo ok"])
    assert stream(url) == (b"ok\n", b"", 0)


def test_exec_with_a_tty_merges_output_on_stdout(env: CriContainerd, pod: Pod) -> None:
    url = env.cri.exec_url(pod.waiter, ["sh", "-c", "head -n 1; [ -t 1 ] && echo a tty >&2; exit 4"], stdin=True,
                           tty=True)
    stdout, stderr, code = stream(url, stdin=b"hi\n", tty=True)
    assert (stderr, code) == (b"", 4)
    assert stdout.endswith(b"hi\r\na tty\r\n"), stdout  # after the terminal's echo of stdin


# --- containers ------------------------------------------------------------------------------------


def test_exit_code_shows_in_container_status(env: CriContainerd, pod: Pod) -> None:
    with running(env.cri, pod, container_config("exits", ["sh", "-c", "exit 3"], pod=pod.config)) as cid:
        status = wait_exited(env.cri, cid)
    assert (status.exit_code, status.reason) == (3, "Error")
    # Both set, but not necessarily in order: CRI stamps started_at when StartContainer returns, and a
    # process this short has exited by then (finished_at is the runtime's exit time).
    assert status.started_at > 0 and status.finished_at > 0


def test_logs_are_written_in_cri_format(env: CriContainerd, pod: Pod) -> None:
    config = container_config("logs", ["sh", "-c", "echo out; echo err >&2; printf partial"], pod=pod.config)
    with running(env.cri, pod, config) as cid:
        wait_exited(env.cri, cid)
        assert env.cri.container_status(cid).status.log_path == str(Path(pod.config.log_directory) / "logs.log")
        lines = wait_logged(pod, config, "partial")
    by_stream = {(m["stream"], m["tag"], m["text"]) for m in lines}
    assert by_stream == {("stdout", "F", "out"), ("stderr", "F", "err"), ("stdout", "P", "partial")}


def test_container_stats_answer(env: CriContainerd, pod: Pod) -> None:
    stats = env.cri.container_stats(pod.httpd).stats
    assert stats.attributes.id == pod.httpd and stats.attributes.metadata.name == "httpd"
    assert stats.cpu.timestamp > 0 and stats.cpu.usage_core_nano_seconds.value > 0
    assert stats.memory.working_set_bytes.value > 0
    assert stats.HasField("writable_layer")


def test_stop_container_sends_sigterm_within_the_grace_period(env: CriContainerd, pod: Pod) -> None:
    script = "trap 'echo bye; exit 42' TERM; echo ready; while :; do sleep 1 & wait; done"
    config = container_config("graceful", ["sh", "-c", script], pod=pod.config)
    with running(env.cri, pod, config) as cid:
        wait_logged(pod, config, "ready")
        began = time.monotonic()
        env.cri.stop_container(cid, grace=30)
        took = time.monotonic() - began
        status = env.cri.container_status(cid).status
    assert (status.state, status.exit_code) == (api.CONTAINER_EXITED, 42)
    assert took < 10, f"StopContainer took {took:.1f}s though the container exited at SIGTERM"


def test_stop_container_kills_after_the_grace_period(env: CriContainerd, pod: Pod) -> None:
    script = "trap '' TERM; echo ready; while :; do sleep 1 & wait; done"
    config = container_config("stubborn", ["sh", "-c", script], pod=pod.config)
    with running(env.cri, pod, config) as cid:
        wait_logged(pod, config, "ready")
        began = time.monotonic()
        env.cri.stop_container(cid, grace=1)
        took = time.monotonic() - began
        status = env.cri.container_status(cid).status
    assert (status.state, status.exit_code) == (api.CONTAINER_EXITED, 137)  # SIGKILL
    assert took >= 1, f"SIGKILL came after {took:.2f}s, before the 1s grace period ended"


def test_attach_to_a_container_started_with_stdin(env: CriContainerd, pod: Pod) -> None:
    config = container_config("attached", ["sh", "-c", "head -n 1; echo bye >&2; exit 7"], pod=pod.config,
                              stdin=True, stdin_once=True)
    with running(env.cri, pod, config) as cid:
        # Attach reports Success (0) when the attachment ends; the container's own code is its status's.
        assert stream(env.cri.attach_url(cid, stdin=True), stdin=b"hi\n") == (b"hi\n", b"bye\n", 0)
        assert wait_exited(env.cri, cid).exit_code == 7


# --- teardown --------------------------------------------------------------------------------------


@pytest.mark.parametrize("handler", HANDLERS)
def test_stop_and_remove_pod_leave_nothing(env: CriContainerd, handler: str) -> None:
    config = env.pod_config(f"gone-{handler}")
    pod_id = env.cri.run_pod(config, handler).pod_sandbox_id
    container = start(env.cri, pod_id, config, container_config("sleeper", ["sleep", "3600"], pod=config))
    netns = env.netns_of(pod_id)
    assert netns is not None and netns.exists()
    ids = {pod_id, container}

    env.cri.stop_pod(pod_id)
    assert not netns.exists(), f"StopPodSandbox left the netns {netns}"
    assert env.cri.pod_status(pod_id).status.state == api.SANDBOX_NOTREADY
    assert env.cri.container_status(container).status.state == api.CONTAINER_EXITED
    env.cri.remove_pod(pod_id)

    assert pod_id not in {p.id for p in env.cri.list_pods().items}
    assert not env.cri.list_containers(pod_id).containers
    tasks = set(env.ctr("tasks", "ls", "-q").stdout.decode().split())
    containers = set(env.ctr("containers", "ls", "-q").stdout.decode().split())
    assert not ids & (tasks | containers), f"containerd still has {ids & (tasks | containers)}"
    assert not [m for m in mounts_under(env.base_dir) if ids & set(m.parts)], "mounts of the pod left"
    assert not env.shared_entries_of(*ids), f"left in /run/containerd: {env.shared_entries_of(*ids)}"
    assert not [p for p in Path("/var/lib/cni/results").glob(f"*{pod_id}*")], "CNI results cache left"
    assert not qemu_processes(env, pod_id), "the pod's QEMU is left"
    assert not shims_outlive(env, pod_id), "the pod's shim is left"


# --- the uvm handler: one UVM per pod --------------------------------------------------------------


def pod_shims(env: CriContainerd, pod_id: str) -> list[int]:
    """The shim daemons serving a pod (the shim's id is its sandbox's)."""
    return [p for p in shim_processes(env) if pod_id.encode() in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")]


def shims_outlive(env: CriContainerd, pod_id: str, patience: float = 15.0) -> list[int]:
    """The pod's shims still there `patience` seconds after RemovePodSandbox: a shim ends after containerd's
    Shutdown, which containerd does not wait for."""
    deadline = time.monotonic() + patience
    while (left := pod_shims(env, pod_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def uvm_pod(pod: Pod) -> Pod:
    if pod.handler != "uvm":
        pytest.skip("a property of the uvm handler's UVM")
    return pod


def test_a_pod_is_one_shim_one_qemu_in_the_pods_cgroup(env: CriContainerd, pod: Pod) -> None:
    uvm_pod(pod)
    shims = pod_shims(env, pod.id)
    qemus = qemu_processes(env, pod.id)
    assert len(shims) == 1 and len(qemus) == 1, (shims, qemus)
    # Every task of the pod names the UVM's QEMU as its pid (CRI puts /proc/<pid>/ns/* in the specs).
    pids = {line.split()[1] for line in env.ctr("tasks", "ls").stdout.decode().splitlines()[1:]
            if line.split()[0] in (pod.id, pod.httpd, pod.waiter)}
    assert pids == {str(qemus[0])}
    # The host's accounting: the shim and its QEMU in the sandbox's cgroup (under the pod's cgroup parent).
    for pid in (shims[0], qemus[0]):
        groups = [line.split(":", 2)[2] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
        assert any(g.startswith(f"{env.cgroup_parent}/{pod.id}") for g in groups), (pid, groups)


def test_a_bad_uvm_size_annotation_fails_the_pod_by_name_and_leaves_nothing(env: CriContainerd) -> None:
    if "uvm" not in HANDLERS:
        pytest.skip("the uvm handler is not tested")
    before = set(shim_processes(env))
    config = env.pod_config("badsize", annotations={"io.uvmshim.uvm.memory_mib": "lots"})
    with pytest.raises(CriError, match="io.uvmshim.uvm.memory_mib"):
        env.cri.run_pod(config, "uvm")
    assert not [p for p in env.cri.list_pods().items if p.metadata.name == "badsize"]
    assert set(shim_processes(env)) <= before, "a shim of the failed pod is left"


def test_the_uvms_death_is_every_containers_exit_never_success(env: CriContainerd) -> None:
    if "uvm" not in HANDLERS:
        pytest.skip("the uvm handler is not tested")
    config = env.pod_config("doomed")
    pod_id = env.cri.run_pod(config, "uvm").pod_sandbox_id
    try:
        ids = [start(env.cri, pod_id, config, container_config(name, ["sleep", "3600"], pod=config))
               for name in ("one", "two")]
        (qemu,) = qemu_processes(env, pod_id)
        os.kill(qemu, 9)
        for cid in ids:
            status = wait_exited(env.cri, cid, timeout=60)
            assert status.exit_code != 0, f"{cid}: exit code 0 after its UVM was killed"
    finally:
        env.cri.stop_pod(pod_id)
        env.cri.remove_pod(pod_id)
    assert not qemu_processes(env, pod_id) and not shims_outlive(env, pod_id)
