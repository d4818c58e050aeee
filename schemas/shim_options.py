"""The shim's TOML configuration file: what UVM to boot for each task, and how the shim behaves.

```toml
log_level = "info"          # debug | info | warning | error
stop_grace_s = 10           # shutdown, wait this long, terminate, wait this long again

[uvm]                       # any of these UvmConfig fields; everything else is chosen per task
cpus = 1
memory_mib = 256
accel = "auto"              # auto | kvm | tcg
image = "/srv/uvmshim/images"
boot_timeout = 60
backend = "qemu"            # qemu | libvirt
start = "cold"              # cold | template | auto: clone each task's UVM from a saved template
template_autobuild = false  # with auto: build a missing template in the background
```

and, at the top level, `rootfs = "block"` (or "9p"), `scratch_size_gb = 20`, `layer_cache_dir`,
`layer_cache_max_gb = 20` for an image-based container's root filesystem (shim/containerd/blockroot.py).

Found through containerd's runtime options (`ConfigPath`, i.e. `ctr run --runtime-config-path`), else
$UVMSHIM_CONFIG, else /etc/uvmshim/config.toml when it exists, else the defaults. Unknown keys and bad
values are rejected with the key named: `load_options` raises ``OptionsError``.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.uvm_config import UvmConfig

DEFAULT_PATH = Path("/etc/uvmshim/config.toml")
# The UvmConfig fields an operator sets in the file; ids, shares, directories come from the task.
UVM_KEYS = frozenset({"cpus", "memory_mib", "image", "kernel", "initrd", "rootfs", "kernel_args", "accel",
                      "boot_timeout", "launch_timeout", "backend", "libvirt_uri", "libvirt_image_dir", "qemu_binary",
                      "tb_size_mib", "scsi_controllers", "start", "template_autobuild", "template_dir",
                      "template_memory_dir", "state_dir", "confine", "confine_uid_range"})


class OptionsError(ValueError):
    """The configuration file is missing, unreadable, not TOML, or has an unknown key or bad value."""


class ShimOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    stop_grace_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    uvm: dict[str, Any] = Field(default_factory=dict)
    # An image-based container's root filesystem (shim/containerd/blockroot.py): "block" gives the UVM its
    # layers as read-only erofs disks (built once per layer, kept in layer_cache_dir, default
    # <uvm.state_dir>/layers, pruned beyond layer_cache_max_gb) and a sparse ext4 scratch of scratch_size_gb
    # for what it writes, which goes back to containerd's snapshot when the task ends; "9p" shares the host's
    # overlay mount instead (15-50x slower for metadata-heavy work). A plain host directory (`ctr run
    # --rootfs DIR`) is always shared over 9p.
    rootfs: Literal["block", "9p"] = "block"
    scratch_size_gb: Annotated[int, Field(ge=1, le=4096)] = 20
    layer_cache_dir: Path | None = None
    layer_cache_max_gb: Annotated[float, Field(gt=0, le=65536)] = 20.0

    @field_validator("uvm")
    @classmethod
    def _uvm_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - UVM_KEYS)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(UVM_KEYS))}")
        UvmConfig.model_validate({**v, "id": "check"})  # the values, with UvmConfig's own rules
        return v

    def uvm_config(self, **task_fields: Any) -> UvmConfig:
        """The UvmConfig for one task: the file's [uvm] table plus what the task decides (id, shares…)."""
        return UvmConfig.model_validate({**self.uvm, **task_fields})


def describe(e: ValidationError) -> str:
    """One line per problem, each naming the key: `uvm.cpus: Input should be greater than or equal to 1`."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "check")
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def find_config(explicit: str | None) -> Path | None:
    """The file to read: the runtime options' path, $UVMSHIM_CONFIG, or the default if it exists."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("UVMSHIM_CONFIG")
    if env:
        return Path(env)
    return DEFAULT_PATH if DEFAULT_PATH.exists() else None


def load_options(path: Path | None) -> ShimOptions:
    """Read and validate the file (None: the defaults). Raises OptionsError naming file and key."""
    if path is None:
        return ShimOptions()
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise OptionsError(f"config {path}: cannot read: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise OptionsError(f"config {path}: not valid TOML: {e}") from None
    try:
        return ShimOptions.model_validate(data)
    except ValidationError as e:
        raise OptionsError(f"config {path}: {describe(e)}") from None
