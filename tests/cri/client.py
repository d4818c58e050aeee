"""A small synchronous client of the Kubernetes CRI (runtime.v1), as the kubelet would talk to containerd.

Two layers, one channel each:

- `CriClient`: gRPC over containerd's unix socket. Each method sends one typed request (the messages of
  tests/cri/api.proto) with a deadline and returns the typed response; a failed call raises `CriError`
  naming the method, the object and containerd's gRPC status.
- `stream`: Exec and Attach do not carry data over gRPC. They return a single-use URL on CRI's
  streaming server (an HTTP server of containerd's, on 127.0.0.1 and a random port here), which speaks
  SPDY or WebSocket. We speak WebSocket with the subprotocol ``v4.channel.k8s.io``: every binary
  message starts with a channel byte -- 0 stdin (client to server), 1 stdout, 2 stderr, 3 error (one JSON
  ``metav1.Status`` when the command has ended), 4 resize (JSON ``{"Width": w, "Height": h}``, client to
  server) -- followed by the payload. The server first sends an empty stdout message (the "ready"
  signal), then output as it comes, then the status, then closes.

What v4 cannot do (kubernetes/kubernetes#89899, fixed only by ``v5.channel.k8s.io``, added in Kubernetes
1.29, which containerd 1.6's streaming server does not offer): half-close stdin. The server's reader passes an empty stdin
message on as a zero-byte write, which is no EOF; and when the client closes the WebSocket, the server
closes every channel and the socket at once, so the process does get EOF on stdin but whatever it
prints afterwards, and its exit status, are lost. So `stream` sends stdin and never ends it: a command
given stdin must stop reading on its own (``head -n 1``, ``read line``), not wait for EOF (``cat``).

The exit status: ``{"status": "Success"}`` is 0; a non-zero exit is ``{"status": "Failure", "reason":
"NonZeroExitCode", "details": {"causes": [{"reason": "ExitCode", "message": "5"}]}}``; any other failure
(the process could not start, an internal error) raises `StreamError`. Attach reports Success when the
attachment ends, whatever the container's exit code (ask ContainerStatus for that).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from tests.cri import api_pb2 as api
from tests.cri import api_pb2_grpc as api_grpc
from uvm.errors import UvmError

__all__ = ["CHANNEL_PROTOCOL", "CriClient", "CriError", "StreamError", "exit_code_of", "stream"]

log = logging.getLogger(__name__)

# Seconds a call may take unless the caller says otherwise: RunPodSandbox with a VM runtime boots a VM.
DEFAULT_TIMEOUT = 120.0
CHANNEL_PROTOCOL = "v4.channel.k8s.io"
STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)

Response = TypeVar("Response", bound=Message)


class CriError(UvmError):
    """A CRI call failed. ``method`` (e.g. "RunPodSandbox"), ``code`` (a grpc.StatusCode, None if the
    call never got an answer) and ``details`` (containerd's message) say which and why."""

    def __init__(self, message: str, method: str, code: grpc.StatusCode | None, details: str) -> None:
        super().__init__(message, method=method, code=code, details=details)
        self.method = method
        self.code = code
        self.details = details


class StreamError(UvmError):
    """An Exec or Attach stream failed: the server refused the WebSocket, closed it without a status, or
    reported a failure that is not an exit code. ``status`` holds the server's JSON status, if any."""

    def __init__(self, message: str, url: str, status: dict[str, Any] | None = None) -> None:
        super().__init__(message, url=url, status=status)
        self.url = url
        self.status = status


class CriClient:
    """containerd's CRI services (RuntimeService, ImageService) on ``address`` (a unix socket path).

    Use as a context manager or call close(). Every method takes ``timeout`` (seconds, default the
    client's) as its gRPC deadline and raises CriError when the call fails or passes it.
    """

    def __init__(self, address: str | Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = str(address)
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix://{self.address}")
        self._runtime = api_grpc.RuntimeServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._images = api_grpc.ImageServiceStub(self._channel)  # type: ignore[no-untyped-call]

    def __repr__(self) -> str:
        return f"<CriClient unix://{self.address}>"

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the gRPC channel (idempotent)."""
        self._channel.close()

    def _call(self, rpc: Callable[..., object], request: Message, response_type: type[Response], timeout: float | None,
              about: str = "") -> Response:
        """One unary call with a deadline; grpc.RpcError becomes CriError naming the method and object."""
        method = type(request).__name__.removesuffix("Request")
        log.debug("--> %s %s", method, about)
        try:
            response = rpc(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            details = (e.details() if isinstance(e, grpc.Call) else None) or str(e)
            name = code.name if code is not None else "no answer"
            raise CriError(f"CRI {method}{' ' + about if about else ''} at {self.address}: {name}: {details}",
                           method, code, details) from None
        if not isinstance(response, response_type):  # the generated stubs are untyped: say what we expect
            raise TypeError(f"CRI {method} answered a {type(response).__name__}, not a {response_type.__name__}")
        log.debug("<-- %s %s", method, about)
        return response

    # --- runtime --------------------------------------------------------------------------------------

    def version(self, timeout: float | None = None) -> api.VersionResponse:
        return self._call(self._runtime.Version, api.VersionRequest(version="v1"), api.VersionResponse, timeout)

    def status(self, timeout: float | None = None) -> api.StatusResponse:
        """RuntimeReady and NetworkReady (false until CRI has loaded a CNI config)."""
        return self._call(self._runtime.Status, api.StatusRequest(), api.StatusResponse, timeout)

    # --- pods -----------------------------------------------------------------------------------------

    def run_pod(self, config: api.PodSandboxConfig, handler: str = "",
                timeout: float | None = None) -> api.RunPodSandboxResponse:
        """Create and start a pod sandbox with the runtime ``handler`` ("" = containerd's default)."""
        request = api.RunPodSandboxRequest(config=config, runtime_handler=handler)
        about = f"{config.metadata.name} ({handler or 'default handler'})"
        return self._call(self._runtime.RunPodSandbox, request, api.RunPodSandboxResponse, timeout, about)

    def stop_pod(self, pod_id: str, timeout: float | None = None) -> api.StopPodSandboxResponse:
        """Kill every container of the pod and the sandbox, run CNI DEL, remove the netns. Idempotent."""
        request = api.StopPodSandboxRequest(pod_sandbox_id=pod_id)
        return self._call(self._runtime.StopPodSandbox, request, api.StopPodSandboxResponse, timeout, pod_id)

    def remove_pod(self, pod_id: str, timeout: float | None = None) -> api.RemovePodSandboxResponse:
        """Remove a pod and its containers (stopping them first if needed). Idempotent."""
        request = api.RemovePodSandboxRequest(pod_sandbox_id=pod_id)
        return self._call(self._runtime.RemovePodSandbox, request, api.RemovePodSandboxResponse, timeout, pod_id)

    def pod_status(self, pod_id: str, verbose: bool = False,
                   timeout: float | None = None) -> api.PodSandboxStatusResponse:
        """The pod's state and IP; with ``verbose``, info["info"] is containerd's JSON about it (pid,
        runtimeSpec with the netns path, CNI result)."""
        request = api.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose)
        return self._call(self._runtime.PodSandboxStatus, request, api.PodSandboxStatusResponse, timeout, pod_id)

    def list_pods(self, timeout: float | None = None) -> api.ListPodSandboxResponse:
        return self._call(self._runtime.ListPodSandbox, api.ListPodSandboxRequest(), api.ListPodSandboxResponse, timeout)

    # --- containers -----------------------------------------------------------------------------------

    def create_container(self, pod_id: str, config: api.ContainerConfig, pod_config: api.PodSandboxConfig,
                         timeout: float | None = None) -> api.CreateContainerResponse:
        """Create a container in the pod; ``pod_config`` must be the config the pod was run with."""
        request = api.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config)
        about = f"{config.metadata.name} in pod {pod_id}"
        return self._call(self._runtime.CreateContainer, request, api.CreateContainerResponse, timeout, about)

    def start_container(self, container_id: str, timeout: float | None = None) -> api.StartContainerResponse:
        request = api.StartContainerRequest(container_id=container_id)
        return self._call(self._runtime.StartContainer, request, api.StartContainerResponse, timeout, container_id)

    def stop_container(self, container_id: str, grace: int = 0,
                       timeout: float | None = None) -> api.StopContainerResponse:
        """Send the image's stop signal (SIGTERM), then SIGKILL after ``grace`` seconds (0: SIGKILL at once).
        The call's deadline is ``grace`` plus ``timeout``."""
        request = api.StopContainerRequest(container_id=container_id, timeout=grace)
        deadline = (self.timeout if timeout is None else timeout) + grace
        return self._call(self._runtime.StopContainer, request, api.StopContainerResponse, deadline, container_id)

    def remove_container(self, container_id: str, timeout: float | None = None) -> api.RemoveContainerResponse:
        request = api.RemoveContainerRequest(container_id=container_id)
        return self._call(self._runtime.RemoveContainer, request, api.RemoveContainerResponse, timeout, container_id)

    def container_status(self, container_id: str, verbose: bool = False,
                         timeout: float | None = None) -> api.ContainerStatusResponse:
        request = api.ContainerStatusRequest(container_id=container_id, verbose=verbose)
        return self._call(self._runtime.ContainerStatus, request, api.ContainerStatusResponse, timeout, container_id)

    def list_containers(self, pod_id: str = "", timeout: float | None = None) -> api.ListContainersResponse:
        """All containers, or those of one pod."""
        request = api.ListContainersRequest(filter=api.ContainerFilter(pod_sandbox_id=pod_id))
        return self._call(self._runtime.ListContainers, request, api.ListContainersResponse, timeout, pod_id)

    def container_stats(self, container_id: str, timeout: float | None = None) -> api.ContainerStatsResponse:
        request = api.ContainerStatsRequest(container_id=container_id)
        return self._call(self._runtime.ContainerStats, request, api.ContainerStatsResponse, timeout, container_id)

    # --- exec and attach ------------------------------------------------------------------------------

    def exec_sync(self, container_id: str, cmd: list[str], exec_timeout: int = 0,
                  timeout: float | None = None) -> api.ExecSyncResponse:
        """Run ``cmd`` in the container and collect its output and exit code. ``exec_timeout`` (seconds,
        0 = none) is CRI's own limit on the command, ``timeout`` the call's deadline."""
        request = api.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=exec_timeout)
        return self._call(self._runtime.ExecSync, request, api.ExecSyncResponse, timeout, f"{cmd} in {container_id}")

    def exec_url(self, container_id: str, cmd: list[str], stdin: bool = False, tty: bool = False,
                 timeout: float | None = None) -> str:
        """A streaming URL to run ``cmd`` (stdout always, stderr unless ``tty``): pass it to `stream`."""
        request = api.ExecRequest(container_id=container_id, cmd=cmd, tty=tty, stdin=stdin, stdout=True, stderr=not tty)
        return self._call(self._runtime.Exec, request, api.ExecResponse, timeout, f"{cmd} in {container_id}").url

    def attach_url(self, container_id: str, stdin: bool = False, tty: bool = False,
                   timeout: float | None = None) -> str:
        """A streaming URL attached to the container's stdio; ``tty`` must match its ContainerConfig."""
        request = api.AttachRequest(container_id=container_id, stdin=stdin, tty=tty, stdout=True, stderr=not tty)
        return self._call(self._runtime.Attach, request, api.AttachResponse, timeout, container_id).url

    # --- images ---------------------------------------------------------------------------------------

    def image_status(self, ref: str, timeout: float | None = None) -> api.ImageStatusResponse:
        """The image CRI knows by ``ref`` (response.HasField("image") is False when it knows none)."""
        request = api.ImageStatusRequest(image=api.ImageSpec(image=ref))
        return self._call(self._images.ImageStatus, request, api.ImageStatusResponse, timeout, ref)

    def list_images(self, timeout: float | None = None) -> api.ListImagesResponse:
        return self._call(self._images.ListImages, api.ListImagesRequest(), api.ListImagesResponse, timeout)


# --- the streaming server --------------------------------------------------------------------------


def stream(url: str, stdin: bytes | None = None, tty: bool = False, timeout: float = 60.0,
           size: tuple[int, int] = (80, 24)) -> tuple[bytes, bytes, int]:
    """Run an Exec or Attach session of CRI's streaming server to its end: (stdout, stderr, exit code).

    ``stdin`` is sent as soon as the WebSocket is open, and never closed (v4 cannot: see the module docstring),
    so the command must stop reading by itself. With ``tty``, output comes on stdout only (with the
    terminal's CR LF and its echo of stdin), and the terminal ``size`` (columns, rows) is sent first on
    the resize channel -- containerd applies it asynchronously, so the command may still see 0x0 at first.
    Attach sessions report exit code 0 when they end. Raises StreamError if the server refuses the
    session, fails it, or closes it without a status; TimeoutError if it does not end within ``timeout``.
    """
    ws_url = "ws" + url.removeprefix("http") if url.startswith("http") else url
    deadline = time.monotonic() + timeout
    out: dict[int, bytearray] = {STDOUT: bytearray(), STDERR: bytearray(), ERROR: bytearray()}
    try:
        ws = connect(ws_url, subprotocols=[Subprotocol(CHANNEL_PROTOCOL)], compression=None, proxy=None,
                     open_timeout=timeout, ping_interval=None, max_size=None)
    except (OSError, InvalidHandshake, InvalidURI) as e:  # HTTP 404: the token was used or has expired
        raise StreamError(f"streaming server {url}: cannot open a WebSocket: {e}", url) from None
    with ws:
        if ws.subprotocol != CHANNEL_PROTOCOL:
            raise StreamError(f"streaming server {url} chose subprotocol {ws.subprotocol!r}, not {CHANNEL_PROTOCOL}", url)
        if tty:
            ws.send(bytes([RESIZE]) + json.dumps({"Width": size[0], "Height": size[1]}).encode())
        if stdin:
            ws.send(bytes([STDIN]) + stdin)
        _receive_until_closed(ws, out, deadline, url)
    status = _parse_status(bytes(out[ERROR]), url)
    return bytes(out[STDOUT]), bytes(out[STDERR]), exit_code_of(status, url)


def _receive_until_closed(ws: ClientConnection, out: dict[int, bytearray], deadline: float, url: str) -> None:
    """Sort the server's messages into ``out`` by channel until it closes the connection."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"streaming session {url} did not end in time; got so far: "
                               f"stdout {bytes(out[STDOUT])!r}, stderr {bytes(out[STDERR])!r}")
        try:
            message = ws.recv(timeout=left)
        except TimeoutError:
            continue
        except ConnectionClosed:
            return
        if isinstance(message, str):
            raise StreamError(f"streaming server {url} sent a text message; {CHANNEL_PROTOCOL} is binary", url)
        if not message:
            continue
        channel, data = message[0], message[1:]
        if channel not in out:
            raise StreamError(f"streaming server {url} sent a message on channel {channel}", url)
        out[channel] += data


def _parse_status(raw: bytes, url: str) -> dict[str, Any]:
    if not raw:
        raise StreamError(f"streaming server {url} closed the session without a status on the error channel", url)
    try:
        status = json.loads(raw)
    except ValueError:
        raise StreamError(f"streaming server {url} sent a status that is not JSON: {raw!r}", url) from None
    if not isinstance(status, dict):
        raise StreamError(f"streaming server {url} sent a status that is not an object: {raw!r}", url)
    return status


def exit_code_of(status: dict[str, Any], url: str = "") -> int:
    """The exit code a v4 status reports: 0 for Success, the ExitCode cause of a NonZeroExitCode failure.
    Raises StreamError for any other failure (its message is the server's)."""
    if status.get("status") == "Success":
        return 0
    causes = (status.get("details") or {}).get("causes") or []
    for cause in causes:
        if cause.get("reason") == "ExitCode":
            try:
                return int(cause.get("message", ""))
            except ValueError:
                break
    raise StreamError(f"streaming session {url} failed: {status.get('message') or status}", url, status)
