"""The agent protocol's messages: names, error codes and limits. Stdlib only (the guest imports it).

Control payloads are JSON objects:

* request  (frame type REQUEST, id = request id):   ``{"method": str, "params": {...}}``
* response (frame type RESPONSE, same id):          the result object, or with FLAG_ERROR
  ``{"code": str, "message": str}``
* notification (frame type NOTIFY, id 0):           ``{"event": str, ...}``

The host validates every guest payload against the pydantic models in ``schemas.agent_models``.
"""

from __future__ import annotations

PROTOCOL_VERSION = 1
#: The port name of the agent's virtio-serial channel.
AGENT_PORT_NAME = "uvmshim.agent"

# Methods (host -> guest).
HELLO = "hello"
PING = "ping"
SHUTDOWN = "shutdown"
RUN = "run"  # run a command in the UVM itself to completion, returning status and output

# Processes with streamed stdio, in the UVM itself (container null) or in a container.
EXEC = "exec_process"            # {container, process: OCI Process, terminal, stdin, stdout, stderr} -> {pid}
SIGNAL = "signal_process"        # {container, pid, signal} -> {delivered}
RESIZE = "resize_console"        # {container, pid, width, height} -> {}
# Containers (the guest runtime over crun).
CREATE = "create_container"      # {id, spec: OCI spec, rootfs: {share, path}, terminal, stdin, stdout, stderr} -> {pid}
START = "start_container"        # {id} -> {pid}
KILL = "kill_container"          # {id, signal, all} -> {}
PAUSE = "pause_container"        # {id} -> {}
RESUME = "resume_container"      # {id} -> {}
STATE = "container_state"        # {id} -> ContainerState
LIST = "list_containers"         # {} -> {containers: [ContainerState]}
PROCESSES = "container_processes"  # {id} -> {pids: [int]}
UPDATE = "update_container"      # {id, resources: OCI LinuxResources} -> {}
STATS = "container_stats"        # {id} -> ContainerStats
DELETE = "delete_container"      # {id} -> {}
# Disks hot-plugged on virtio-scsi (the host attached them already).
SCSI_MOUNT = "scsi_mount"        # {controller, lun, path|null, fstype, options, readonly} -> {device, path}
SCSI_UNMOUNT = "scsi_unmount"    # {path} -> {}
SCSI_UNPLUG = "scsi_unplug"      # {controller, lun} -> {}
# The container's network (uvm/network.py, uvm/guest/net.py): each NIC found by nic_mac takes a veth's identity.
CONFIGURE_NETWORK = "configure_network"  # {interfaces: [{nic_mac, name, mac, mtu, addresses: [{family, address,
#                                           prefixlen}]}], routes: [{family, dest, dest_prefixlen, gateway, source,
#                                           device, scope, metric}], neighbours: [{family, address, mac, device}]} -> {}
# Templates (uvm/template.py): warm a VM before it is saved; make a clone its own machine.
PREPARE_TEMPLATE = "prepare_template"  # {} -> {}: load what containers need, nothing container-specific
# A clone's handshake: hello's version negotiation and result, after the clone made itself its own machine.
RESUME_CLONE = "resume_clone"    # {version, vm_id, time_ns, entropy (base64, 32-512 bytes)} -> hello's result
MAX_ENTROPY = 512

METHODS = (HELLO, PING, SHUTDOWN, RUN, EXEC, SIGNAL, RESIZE, CREATE, START, KILL, PAUSE, RESUME, STATE, LIST,
           PROCESSES, UPDATE, STATS, DELETE, SCSI_MOUNT, SCSI_UNMOUNT, SCSI_UNPLUG, CONFIGURE_NETWORK, PREPARE_TEMPLATE,
           RESUME_CLONE)
CAPABILITIES = ("ping", "shutdown", "run", "exec", "containers", "streams", "scsi", "overlay", "clone", "network")

# Notifications (guest -> host).
EVENT_LOG = "log"
EVENT_EXIT = "exit"  # {container, pid, exit_status, signal, at}: sent after the process's output streams ended
EVENT_OOM = "oom"    # {container, oom_kills, at}

# Error codes carried in error responses, mapped to typed errors on the host.
E_INVALID = "invalid_argument"
E_NOT_FOUND = "not_found"
E_ALREADY_EXISTS = "already_exists"
E_UNSUPPORTED = "unsupported"
E_INTERNAL = "internal"
# The guest runtime's six (hcsshim's guest runtime errors).
E_STILL_RUNNING = "still_running"
E_NOT_RUNNING = "not_running"
E_NOT_STOPPED = "not_stopped"
E_INVALID_ID = "invalid_container_id"
ERROR_CODES = (E_INVALID, E_NOT_FOUND, E_ALREADY_EXISTS, E_UNSUPPORTED, E_INTERNAL, E_STILL_RUNNING,
               E_NOT_RUNNING, E_NOT_STOPPED, E_INVALID_ID)

# Container states.
CREATED = "created"
RUNNING = "running"
PAUSED = "paused"
STOPPED = "stopped"

# Streams: DATA frames carry bytes, CREDIT frames a u32 count of bytes the receiver may take more,
# CLOSE ends the direction (stdin: EOF to the process; stdout/stderr: EOF to the host, or from the
# host, "stop reading"). The sender starts with the window's credit per stream and sends DATA of
# at most the chunk. Output (stdout/stderr, guest -> host) has the larger window and chunk: the host
# buffers it, and under emulation each frame costs the guest (a wake-up, a splice, a device kick),
# so 1 MiB frames with 4 in flight move twice what 256 KiB frames with 4 in flight did. Input (stdin,
# host -> guest) is buffered in the small guest's RAM: 1 MiB per stream at most.
OUTPUT_WINDOW = 4 * 1024 * 1024
OUTPUT_CHUNK = 1024 * 1024
INPUT_WINDOW = 1024 * 1024
INPUT_CHUNK = 256 * 1024

# Limits.
MAX_CONTROL_PAYLOAD = 768 * 1024  # a control message larger than this is refused (two full RUN outputs fit)
MAX_RUN_OUTPUT = 256 * 1024       # per stream captured by RUN; more is counted and dropped
MAX_ARGV = 4096
MAX_SPEC = 512 * 1024
MAX_ERROR_MESSAGE = 4096
