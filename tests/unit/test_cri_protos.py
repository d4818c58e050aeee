"""The CRI test client's messages: the checked-in generated code matches tests/cri/api.proto, and the
names and field numbers are cri-api v0.25's (what containerd 1.6.20 decodes), since the .proto is a
hand-written subset that nothing else checks against upstream."""

from __future__ import annotations

from pathlib import Path

from google.protobuf.message import Message

from tests.cri import api_pb2 as api
from tests.cri import compile as cri_compile


def numbers(message: type[Message]) -> dict[str, int]:
    return {f.name: f.number for f in message.DESCRIPTOR.fields}


def test_generated_code_matches_the_proto_file(tmp_path: Path) -> None:
    cri_compile.compile_protos(tmp_path)
    for name in cri_compile.GENERATED:
        fresh = tmp_path / "tests" / "cri" / name
        checked_in = cri_compile.HERE / name
        assert checked_in.read_bytes() == fresh.read_bytes(), f"{checked_in.name} is stale: run `python -m tests.cri.compile`"


def test_services_have_cri_names() -> None:
    runtime = api.DESCRIPTOR.services_by_name["RuntimeService"]
    assert runtime.full_name == "runtime.v1.RuntimeService"
    assert {"RunPodSandbox", "StopPodSandbox", "RemovePodSandbox", "PodSandboxStatus", "CreateContainer",
            "StartContainer", "StopContainer", "RemoveContainer", "ContainerStatus", "ExecSync", "Exec", "Attach",
            "ContainerStats"} <= {m.name for m in runtime.methods}
    assert api.DESCRIPTOR.services_by_name["ImageService"].full_name == "runtime.v1.ImageService"


def test_field_numbers_are_cri_api_v0_25s() -> None:
    # Read from k8s.io/cri-api pkg/apis/runtime/v1/api.proto at tag v0.25.0.
    assert numbers(api.RunPodSandboxRequest) == {"config": 1, "runtime_handler": 2}
    assert numbers(api.PodSandboxConfig) == {
        "metadata": 1, "hostname": 2, "log_directory": 3, "dns_config": 4, "port_mappings": 5, "labels": 6,
        "annotations": 7, "linux": 8}
    assert numbers(api.LinuxPodSandboxConfig) == {
        "cgroup_parent": 1, "security_context": 2, "sysctls": 3, "overhead": 4, "resources": 5}
    config = numbers(api.ContainerConfig)
    assert config["log_path"] == 11 and config["envs"] == 6 and config["labels"] == 9  # 8 (devices) is skipped
    assert (config["stdin"], config["stdin_once"], config["tty"], config["linux"]) == (12, 13, 14, 15)
    assert numbers(api.LinuxContainerSecurityContext)["run_as_group"] == 12
    assert numbers(api.NamespaceOption) == {"network": 1, "pid": 2, "ipc": 3, "target_id": 4}
    status = numbers(api.ContainerStatus)
    assert (status["exit_code"], status["reason"], status["message"], status["log_path"]) == (7, 10, 11, 15)
    assert numbers(api.PodSandboxStatus)["network"] == 5
    assert numbers(api.ExecSyncResponse) == {"stdout": 1, "stderr": 2, "exit_code": 3}
    # Exec and Attach order their flags differently.
    assert numbers(api.ExecRequest) == {"container_id": 1, "cmd": 2, "tty": 3, "stdin": 4, "stdout": 5,
                                                   "stderr": 6}
    assert numbers(api.AttachRequest) == {"container_id": 1, "stdin": 2, "tty": 3, "stdout": 4, "stderr": 5}
    assert numbers(api.ContainerStats) == {"attributes": 1, "cpu": 2, "memory": 3, "writable_layer": 4}
    assert api.NamespaceMode.Value("CONTAINER") == 1 and api.ContainerState.Value("CONTAINER_EXITED") == 2


def test_bytes_on_the_wire() -> None:
    # As the kubelet's Go code would encode them.
    wire = api.RunPodSandboxRequest(runtime_handler="uvm").SerializeToString()
    assert wire == b"\x12\x03uvm"
    wire = api.StopContainerRequest(container_id="c", timeout=5).SerializeToString()
    assert wire == b"\x0a\x01c\x10\x05"
    config = api.ContainerConfig(log_path="a.log", tty=True)
    assert config.SerializeToString() == b"\x5a\x05a.log\x70\x01"
