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

METHODS = (HELLO, PING, SHUTDOWN, RUN)
CAPABILITIES = ("ping", "shutdown", "run")

# Notifications (guest -> host).
EVENT_LOG = "log"

# Error codes carried in error responses, mapped to typed errors on the host.
E_INVALID = "invalid_argument"
E_NOT_FOUND = "not_found"
E_ALREADY_EXISTS = "already_exists"
E_UNSUPPORTED = "unsupported"
E_INTERNAL = "internal"
ERROR_CODES = (E_INVALID, E_NOT_FOUND, E_ALREADY_EXISTS, E_UNSUPPORTED, E_INTERNAL)

# Limits.
MAX_CONTROL_PAYLOAD = 768 * 1024  # a control message larger than this is refused (two full RUN outputs fit)
MAX_RUN_OUTPUT = 256 * 1024       # per stream captured by RUN; more is counted and dropped
MAX_ARGV = 4096
MAX_ERROR_MESSAGE = 4096
