"""containerd's runtime options, as the shim receives them: a google.protobuf.Any on `start`'s stdin
and in CreateTaskRequest.options. `ctr run --runtime-config-path P` sends runtimeoptions.v1.Options."""

from __future__ import annotations

from google.protobuf import any_pb2

from schemas.containerd import runtimeoptions_pb2

RUNTIME_OPTIONS = "runtimeoptions.v1.Options"


def config_path(options: any_pb2.Any) -> str | None:
    """ConfigPath, or None for options of another type or without one. Raises DecodeError."""
    if not options.type_url.endswith(RUNTIME_OPTIONS):
        return None
    return runtimeoptions_pb2.Options.FromString(options.value).config_path or None
