"""`make demo`, the containerd half: a private containerd runs `ctr run --rm --runtime io.containerd.uvm.v1`
with a busybox rootfs directory; the container runs in its own UVM and prints where it ran."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from shim.containerd_env import ContainerdEnvError, PrivateContainerd, busybox_rootfs


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="uvmdemo-", dir="/tmp"))
    try:
        rootfs = busybox_rootfs(base)
        print("[demo] starting a private containerd ...", flush=True)
        with PrivateContainerd(base / "c", extra_path=[Path(sys.executable).parent], namespace="demo") as ctd:
            argv = ["run", "--rm", "--runtime", "io.containerd.uvm.v1", "--rootfs", str(rootfs), "demo1",
                    "/bin/sh", "-c", "echo hello from a container in UVM $(uname -n), kernel $(uname -r)"]
            print(f"[demo] ctr {' '.join(argv)}", flush=True)
            t0 = time.monotonic()
            res = ctd.ctr(*argv, input=b"", check=False, timeout=300)
            took = time.monotonic() - t0
            sys.stdout.write(res.stdout.decode(errors="replace"))
            if res.returncode != 0:
                print(f"[demo] FAILED: ctr exited {res.returncode}: {res.stderr.decode(errors='replace').strip()}",
                      file=sys.stderr)
                return 1
            print(f"[demo] ctr run --rm took {took:.2f}s (UVM boot, container, teardown); stopping containerd")
        return 0
    except ContainerdEnvError as e:
        print(f"[demo] FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
