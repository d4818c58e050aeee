"""`containerd-shim-uvm-v1`: the containerd runtime v2 shim (runtime io.containerd.uvm.v1).

The task service is not served yet: this entry point only explains itself, and refuses the
shim actions with a clear message rather than pretending to serve them.
"""

from __future__ import annotations

import sys

USAGE = """usage: containerd-shim-uvm-v1 -namespace NS -address SOCK -publish-binary BIN -id ID [-debug] start|delete

containerd runtime v2 shim for io.containerd.uvm.v1: runs each container in its own utility VM.
The task service (start/serve/delete) is not implemented yet in this version.
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    print("containerd-shim-uvm-v1: the shim actions are not implemented yet in this version", file=sys.stderr)
    print(USAGE, end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
