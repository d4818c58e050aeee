"""containerd's messages: the checked-in generated code matches the .proto files, and the names and
field numbers containerd relies on are the ones on the wire."""

from __future__ import annotations

from pathlib import Path

from schemas.containerd import compile as proto_compile
from schemas.containerd import events_task_pb2, shim_pb2, ttrpc_pb2


def test_generated_code_matches_the_proto_files(tmp_path: Path) -> None:
    proto_compile.compile_protos(tmp_path)
    here = proto_compile.HERE
    generated = sorted((tmp_path / "schemas" / "containerd").glob("*_pb2.py*"))
    assert len(generated) == 2 * len(proto_compile.proto_files())
    for fresh in generated:
        checked_in = here / fresh.name
        assert checked_in.read_bytes() == fresh.read_bytes(), f"{checked_in.name} is stale: run `make proto`"


def test_containerd_names_and_field_numbers() -> None:
    task = shim_pb2.DESCRIPTOR.services_by_name["Task"]
    assert task.full_name == "containerd.task.v2.Task"
    assert [m.name for m in task.methods] == [
        "State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint", "Kill", "Exec",
        "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect", "Shutdown"]
    fields = {f.name: f.number for f in shim_pb2.CreateTaskRequest.DESCRIPTOR.fields}
    assert fields == {"id": 1, "bundle": 2, "rootfs": 3, "terminal": 4, "stdin": 5, "stdout": 6, "stderr": 7,
                      "checkpoint": 8, "parent_checkpoint": 9, "options": 10}
    assert events_task_pb2.TaskExit.DESCRIPTOR.full_name == "containerd.events.TaskExit"
    assert {f.name: f.number for f in ttrpc_pb2.Request.DESCRIPTOR.fields} == {
        "service": 1, "method": 2, "payload": 3, "timeout_nano": 4, "metadata": 5}
    # bytes as containerd's Go code would produce them: StateResponse{pid: 7, status: STOPPED, exit_status: 3}
    wire = shim_pb2.StateResponse(pid=7, status="STOPPED", exit_status=3).SerializeToString()
    assert wire == bytes([0x18, 7, 0x20, 3, 0x48, 3])
