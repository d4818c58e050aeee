#!/usr/bin/env python3
"""Build the uvmshim guest image from Debian packages only.

Outputs (under ``--out``, default ``images/out``), each named by the hash of its inputs:

* ``vmlinux-<h>``        the ELF kernel extracted from linux-image-amd64's bzImage (PVH entry), its
                         runs of zero pages turned into bss (see ``zero_pages_as_bss``)
* ``initramfs-<h>.cpio`` uncompressed newc archive: static busybox, the kernel modules the boot
                         needs, and ``/init`` (images/init)
* ``rootfs-<h>.erofs``   read-only root: python3, crun, busybox, the kernel modules loaded on demand,
                         and the agent (uvm/guest + the stdlib-only part of schemas)
* ``manifest.json``      names the current three files (what ``UvmConfig.image`` points at)

Every step prints one progress line. A step whose output already exists for the same input hash
is skipped, so an unchanged rebuild only hashes inputs; a changed agent file rebuilds the rootfs
alone. Runs as root with the host's apt configuration; stdlib only (it runs before the venv).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUILD_FORMAT = "3"  # bump to invalidate every cached output when this script's logic changes

KERNEL_META = "linux-image-amd64"
# dropbear-bin: the SSH server of `runuvm boot --ssh` (started by the host through the agent, never at boot).
ROOTFS_PACKAGES = ["python3.11-minimal", "libpython3.11-stdlib", "crun", "busybox-static", "dropbear-bin"]
# Dependencies we never need in a guest that runs no maintainer scripts and no package manager.
EXCLUDED_PACKAGES = {
    "debconf", "perl-base", "tzdata", "media-types", "mime-support", "readline-common", "dpkg",
    "install-info", "libc-bin", "debianutils", "init-system-helpers", "sensible-utils",
}
# Loaded by /init before the agent starts, in this order (soft dependencies included).
BOOT_MODULES = [
    "virtio_ring", "virtio", "virtio_mmio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
    "virtio_pci", "virtio_blk", "crc32c_generic", "libcrc32c", "erofs", "virtio_console", "virtio_rng",
]
# Shipped in the rootfs and loaded by the agent on first use (disks, shares, overlay rootfs).
ONDEMAND_MODULES = [
    "virtio_scsi", "sd_mod", "crc32c_generic", "ext4", "9p", "9pnet_virtio", "overlay",
    "vmw_vsock_virtio_transport", "virtio_net",
]
# Soft dependencies modinfo's "depends" does not list.
SOFT_DEPS = {"libcrc32c": ["crc32c_generic"], "ext4": ["crc32c_generic"], "jbd2": ["crc32c_generic"]}
# Agent sources copied into the rootfs: the guest package and the stdlib-only schemas.
AGENT_FILES = [
    "uvm/__init__.py",
    "uvm/guest/__init__.py",
    "uvm/guest/agent.py",
    "uvm/guest/errors.py",
    "uvm/guest/export.py",
    "uvm/guest/net.py",
    "uvm/guest/procs.py",
    "uvm/guest/runtime.py",
    "uvm/guest/streams.py",
    "schemas/__init__.py",
    "schemas/framing.py",
    "schemas/agent.py",
    "schemas/wirejson.py",
]
XZ_MAGIC = b"\xfd7zXZ\x00"


def step(msg: str) -> None:
    print(f"[image] {msg}", flush=True)


def run(cmd: list[str], **kw: object) -> str:
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if res.returncode != 0:
        raise SystemExit(f"image build: {' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return str(res.stdout)


def sha256_of(parts: Iterable[bytes | str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_publish(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


# ---------------------------------------------------------------------------------------------
# Debian packages
# ---------------------------------------------------------------------------------------------

def candidate_fields(names: list[str]) -> dict[str, dict[str, str]]:
    """Package -> control fields of its candidate version (apt-cache show)."""
    out = run(["apt-cache", "show", "--no-all-versions", *names])
    result: dict[str, dict[str, str]] = {}
    for block in out.strip().split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line.startswith(" ") and key:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, val = line.partition(":")
                fields[key] = val.strip()
        if "Package" in fields:
            result.setdefault(fields["Package"], fields)
    missing = [n for n in names if n not in result]
    if missing:
        raise SystemExit(f"image build: Debian packages not found: {', '.join(missing)} (run make setup: apt-get update)")
    return result


def resolve(roots: list[str], recursive: bool = True) -> dict[str, dict[str, str]]:
    """The dependency closure of roots (first alternative, Depends + Pre-Depends), minus exclusions."""
    if not recursive:
        return candidate_fields(roots)
    seen: dict[str, dict[str, str]] = {}
    todo = list(roots)
    while todo:
        batch = sorted({n for n in todo if n not in seen and n not in EXCLUDED_PACKAGES})
        todo = []
        if not batch:
            break
        for name, fields in candidate_fields(batch).items():
            seen[name] = fields
            for key in ("Pre-Depends", "Depends"):
                for dep in fields.get(key, "").split(","):
                    if not dep.strip():
                        continue
                    alternatives = [a.strip().split(" ")[0].split(":")[0] for a in dep.split("|")]
                    if any(a in seen or a in EXCLUDED_PACKAGES for a in alternatives):
                        continue
                    todo.append(alternatives[0])
    return seen


def apt_state() -> str:
    """A key that changes whenever apt's package lists or sources change (apt-get update)."""
    parts = []
    for d in (Path("/var/lib/apt/lists"), Path("/etc/apt/sources.list.d"), Path("/etc/apt")):
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if p.is_file():
                    st = p.stat()
                    parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
    return sha256_of(parts)


def resolve_cached(roots: list[str], cache: Path, recursive: bool = True) -> dict[str, dict[str, str]]:
    """resolve(), remembered per apt state: apt-cache costs ~1 s a call, an unchanged rebuild none."""
    key = sha256_of([BUILD_FORMAT, apt_state(), str(recursive), *roots, *sorted(EXCLUDED_PACKAGES)])
    memo = cache / f"resolved-{key}.json"
    if memo.exists():
        loaded: dict[str, dict[str, str]] = json.loads(memo.read_text())
        return loaded
    keep = ("Package", "Version", "Architecture", "Depends")
    result = {n: {k: f[k] for k in keep if k in f} for n, f in resolve(roots, recursive).items()}
    tmp = memo.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, sort_keys=True))
    os.replace(tmp, memo)
    return result


def fetch_debs(pkgs: dict[str, dict[str, str]], cache: Path) -> list[Path]:
    """apt-get download what is not cached yet; return the .deb paths, sorted."""
    cache.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    wanted = []
    for name, f in pkgs.items():
        # apt-get download's own file name: the epoch's ':' is written '%3a'.
        fname = f"{name}_{f['Version'].replace(':', '%3a')}_{f['Architecture']}.deb"
        paths[name] = cache / fname
        if not paths[name].exists():
            wanted.append(f"{name}={f['Version']}")
    if wanted:
        step(f"download {len(wanted)} Debian packages")
        run(["apt-get", "download", "-q", *wanted], cwd=str(cache))
    for name, p in paths.items():
        if not p.exists():
            raise SystemExit(f"image build: {name}: download did not produce {p}")
    return sorted(paths.values())


def extract_debs(debs: list[Path], dest: Path) -> None:
    for deb in debs:
        run(["dpkg-deb", "-x", str(deb), str(dest)])


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------

def kernel_tree(cache: Path) -> tuple[Path, str, str]:
    """Extract the kernel package once. Returns (tree, kernel release, input hash)."""
    meta = resolve_cached([KERNEL_META], cache, recursive=False)[KERNEL_META]
    image_pkg = next(d.strip().split(" ")[0] for d in meta["Depends"].split(",") if d.strip().startswith("linux-image-"))
    fields = resolve_cached([image_pkg], cache, recursive=False)
    debs = fetch_debs(fields, cache / "debs")
    key = sha256_of([BUILD_FORMAT, *(d.name for d in debs)])
    tree = cache / f"kernel-{key}"
    kver = image_pkg.removeprefix("linux-image-")
    if not (tree / ".done").exists():
        step(f"extract {image_pkg} ({fields[image_pkg]['Version']})")
        if tree.exists():
            shutil.rmtree(tree)
        tmp = cache / f"kernel-{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        extract_debs(debs, tmp)
        run(["depmod", "-b", str(tmp), kver])
        (tmp / ".done").write_text(kver)
        os.replace(tmp, tree)
    return tree, kver, key


ELF_PAGE = 4096
PT_LOAD = 1
PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr: type flags offset vaddr paddr filesz memsz align
MIN_ZERO_RUN_PAGES = 16
VMLINUX_FORMAT = "vmlinux 3: zero pages as bss, compact"


def zero_runs(data: bytes, start: int, end: int) -> list[tuple[int, int]]:
    """Page-aligned runs (offsets relative to start) of at least MIN_ZERO_RUN_PAGES zero pages in data[start:end]."""
    runs: list[tuple[int, int]] = []
    run_start = -1
    for at in range(start, end, ELF_PAGE):
        zero = data.count(0, at, min(at + ELF_PAGE, end)) == min(ELF_PAGE, end - at)
        if zero and run_start < 0:
            run_start = at
        elif not zero and run_start >= 0:
            runs.append((run_start - start, at - start))
            run_start = -1
    if run_start >= 0:
        runs.append((run_start - start, end - start))
    return [(a, b) for a, b in runs if b - a >= MIN_ZERO_RUN_PAGES * ELF_PAGE]


def zero_pages_as_bss(elf: bytes) -> bytes:
    """The kernel ELF with each loadable segment's long runs of zero pages (.bss, .brk, the early
    page-table scratch, alignment padding: ~27 of its 57 MiB) declared as memory without file bytes,
    splitting the segment where a run is inside it, and the file rewritten without them.

    QEMU keeps every loaded segment's file bytes mapped for the VM's lifetime (to reload them at a
    reset): zero pages left out of the file are pages no QEMU maps. A fresh guest's RAM is zero and
    the UVM never resets (-no-reboot), so the kernel finds the same bytes. The layout is the ELF
    header, the program headers, then each segment's bytes at a page-aligned offset; section headers
    (nothing loads them) are dropped, a note is moved with the bytes that hold it."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise SystemExit("image build: the kernel is not a little-endian 64-bit ELF")
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    if phentsize != PHDR.size:
        raise SystemExit(f"image build: kernel ELF program headers of {phentsize} bytes")
    loads: list[list[int]] = []  # [flags, old offset, vaddr, paddr, filesz, memsz, align]
    others: list[tuple[int, ...]] = []
    for i in range(phnum):
        ptype, flags, offset, vaddr, paddr, filesz, memsz, align = PHDR.unpack_from(elf, phoff + i * PHDR.size)
        if ptype != PT_LOAD:
            others.append((ptype, flags, offset, vaddr, paddr, filesz, memsz, align))
            continue
        if offset % ELF_PAGE or vaddr % ELF_PAGE:
            raise SystemExit(f"image build: kernel ELF segment at {vaddr:#x} is not page-aligned")
        done = 0
        for run_start, run_end in zero_runs(elf, offset, offset + filesz):
            end = memsz if run_end >= filesz else run_end
            loads.append([flags, offset + done, vaddr + done, paddr + done, run_start - done, end - done, ELF_PAGE])
            done = end
        if done < filesz:
            loads.append([flags, offset + done, vaddr + done, paddr + done, filesz - done, memsz - done, ELF_PAGE])
    count = len(loads) + len(others)
    at = (64 + count * PHDR.size + ELF_PAGE - 1) & ~(ELF_PAGE - 1)
    body = bytearray()
    phdrs: list[tuple[int, ...]] = []
    moved: list[tuple[int, int, int]] = []  # (old offset, size, new offset)
    for flags, old, vaddr, paddr, filesz, memsz, align in loads:
        body += bytes(at - 64 - count * PHDR.size - len(body)) + elf[old:old + filesz]
        phdrs.append((PT_LOAD, flags, at, vaddr, paddr, filesz, memsz, align))
        moved.append((old, filesz, at))
        at = (at + filesz + ELF_PAGE - 1) & ~(ELF_PAGE - 1)
    for ptype, flags, offset, vaddr, paddr, filesz, memsz, align in others:
        home = [new + offset - old for old, size, new in moved if old <= offset and offset + filesz <= old + size]
        if filesz and not home:
            raise SystemExit(f"image build: kernel ELF segment of type {ptype:#x} is outside the loaded bytes")
        phdrs.append((ptype, flags, home[0] if home else 0, vaddr, paddr, filesz, memsz, align))
    head = bytearray(elf[:64])
    struct.pack_into("<Q", head, 0x20, 64)  # e_phoff
    struct.pack_into("<Q", head, 0x28, 0)  # e_shoff
    struct.pack_into("<HH", head, 0x38, count, 0)  # e_phnum, e_shentsize
    struct.pack_into("<HH", head, 0x3C, 0, 0)  # e_shnum, e_shstrndx
    return bytes(head) + b"".join(PHDR.pack(*ph) for ph in phdrs) + bytes(body)


def build_vmlinux(tree: Path, kver: str, kkey: str, out: Path) -> Path:
    target = out / f"vmlinux-{sha256_of([VMLINUX_FORMAT, kkey])}"
    if target.exists():
        step(f"vmlinux up to date ({target.name})")
        return target
    step("extract ELF vmlinux from bzImage (xz payload)")
    bz = (tree / "boot" / f"vmlinuz-{kver}").read_bytes()
    start = bz.find(XZ_MAGIC)
    while start >= 0:
        try:
            dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            elf = dec.decompress(bz[start:])
            if elf[:4] == b"\x7fELF":
                break
        except lzma.LZMAError:
            pass
        start = bz.find(XZ_MAGIC, start + 1)
    else:
        raise SystemExit("image build: no xz-compressed ELF found in the kernel image")
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(zero_pages_as_bss(elf))
    atomic_publish(tmp, target)
    return target


def module_closure(tree: Path, kver: str, names: list[str]) -> list[str]:
    """Relative .ko paths for names and their dependencies, dependencies first."""
    moddir = tree / "lib" / "modules" / kver
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[Path(mod).name.split(".ko")[0].replace("-", "_")] = mod
    order: list[str] = []

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key not in by_name:
            raise SystemExit(f"image build: kernel module {name} not in {kver}")
        for soft in SOFT_DEPS.get(key, []):
            visit(soft)
        mod = by_name[key]
        for dep in reversed(deps[mod]):  # modules.dep lists the deepest dependency last
            visit(Path(dep).name.split(".ko")[0])
        if mod not in order:
            order.append(mod)

    for n in names:
        visit(n)
    return order


# ---------------------------------------------------------------------------------------------
# initramfs (newc cpio written here: deterministic, no external tool)
# ---------------------------------------------------------------------------------------------

class Cpio:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1, rdev: tuple[int, int] = (0, 0)) -> None:
        namez = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0)
        hdr = "070701" + "".join(f"{v:08x}" for v in fields)
        self.ino += 1
        self.buf += hdr.encode() + namez
        self.buf += b"\0" * (-len(self.buf) % 4)
        self.buf += data
        self.buf += b"\0" * (-len(self.buf) % 4)

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.buf)


INITRAMFS_APPLETS = ("sh", "mount", "insmod", "switch_root", "mkdir", "sleep", "cat", "echo", "poweroff", "ln", "ip")


def build_initramfs(ktree: Path, kver: str, busybox: Path, out: Path, kkey: str) -> Path:
    init = (HERE / "init").read_bytes()
    mods = module_closure(ktree, kver, BOOT_MODULES)
    key = sha256_of([BUILD_FORMAT, kkey, file_digest(busybox), init, " ".join(INITRAMFS_APPLETS), *mods])
    target = out / f"initramfs-{key}.cpio"
    if target.exists():
        step(f"initramfs up to date ({target.name})")
        return target
    step(f"initramfs: busybox + {len(mods)} boot modules + /init")
    c = Cpio()
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in INITRAMFS_APPLETS:
        c.symlink(f"bin/{applet}", "busybox")
    moddir = ktree / "lib" / "modules" / kver
    lines = []
    for m in mods:
        name = Path(m).name
        c.file(f"lib/modules/{name}", (moddir / m).read_bytes())
        lines.append(name)
    c.file("lib/modules/boot.list", ("\n".join(lines) + "\n").encode())
    c.file("init", init, 0o755)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(c.finish())
    atomic_publish(tmp, target)
    return target


# ---------------------------------------------------------------------------------------------
# rootfs (erofs): a cached base tree of packages + modules, then the agent on top
# ---------------------------------------------------------------------------------------------

def merge_move(src: Path, dst: Path) -> None:
    """Move the tree src into dst, merging directories that exist in both; src is removed."""
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        target = dst / child.name
        if child.is_dir() and not child.is_symlink() and target.is_dir() and not target.is_symlink():
            merge_move(child, target)
        else:
            os.replace(child, target)
    src.rmdir()


def build_base(cache: Path, ktree: Path, kver: str, kkey: str) -> tuple[Path, str]:
    pkgs = resolve_cached(ROOTFS_PACKAGES, cache)
    debs = fetch_debs(pkgs, cache / "debs")
    mods = module_closure(ktree, kver, ONDEMAND_MODULES)
    key = sha256_of([BUILD_FORMAT, kkey, *(d.name for d in debs), *mods])
    base = cache / f"base-{key}"
    if (base / ".done").exists():
        step(f"rootfs base up to date ({len(debs)} packages)")
        return base, key
    step(f"rootfs base: extract {len(debs)} packages ({', '.join(sorted(pkgs))})")
    tmp = cache / f"base-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    extract_debs(debs, tmp)
    # Debian's merged /usr: bin, sbin, lib, lib64 are links into usr/.
    for d in ("bin", "sbin", "lib", "lib64"):
        p = tmp / d
        if p.is_dir() and not p.is_symlink():
            merge_move(p, tmp / "usr" / d)
        if not p.exists() and not p.is_symlink():
            p.symlink_to(f"usr/{d}")
    for d in ("proc", "sys", "dev", "run", "tmp", "mnt", "etc", "var", "root", "opt/uvmshim", "sys/fs/cgroup"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    (tmp / "usr/bin/python3").unlink(missing_ok=True)
    (tmp / "usr/bin/python3").symlink_to("python3.11")
    # busybox applets the agent and users rely on (sh, mount, umount, ps, ...).
    bb = tmp / "usr/bin/busybox"
    applets = run([str(bb), "--list"]).split()
    for a in applets:
        p = tmp / "usr/bin" / a
        if not p.exists() and not p.is_symlink() and not (tmp / "usr/sbin" / a).exists():
            p.symlink_to("busybox")
    (tmp / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tmp / "etc/group").write_text("root:x:0:\n")
    (tmp / "etc/hostname").write_text("uvm\n")
    # Kernel modules loaded on demand by the agent.
    src = ktree / "lib" / "modules" / kver
    dst = tmp / "usr/lib/modules" / kver
    for m in mods:
        (dst / m).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / m, dst / m)
    for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        shutil.copy2(src / f, dst / f)
    run(["depmod", "-b", str(tmp), kver])
    # Python: precompile the stdlib (dpkg's postinst would have); unchecked-hash pycs never stat sources.
    run([sys.executable, "-m", "compileall", "-q", "-j0", "--invalidation-mode", "unchecked-hash",
         "-s", str(tmp), "-p", "/", "-x", "(lib2to3|idlelib|test|tkinter|ensurepip)/", str(tmp / "usr/lib/python3.11")])
    # Smoke test the tree: every binary the agent runs must load its libraries.
    # (crun itself needs /proc to run, so its libraries are checked through the dynamic loader.)
    for cmd in (["/usr/bin/python3.11", "-S", "-c", "import json, selectors, struct, signal, base64, ctypes"],
                ["/lib64/ld-linux-x86-64.so.2", "--list", "/usr/bin/crun"],
                ["/usr/sbin/dropbear", "-V"], ["/lib64/ld-linux-x86-64.so.2", "--list", "/usr/bin/dropbearkey"]):
        res = subprocess.run(["chroot", str(tmp), *cmd], capture_output=True, text=True, check=False)
        if res.returncode != 0 or "not found" in res.stdout:
            raise SystemExit(f"image build: rootfs smoke test {cmd} failed: {res.stdout}{res.stderr.strip()}")
    (tmp / ".done").write_text(key)
    shutil.rmtree(base, ignore_errors=True)
    os.replace(tmp, base)
    return base, key


def agent_sources() -> list[tuple[str, bytes]]:
    return [(rel, (REPO / rel).read_bytes()) for rel in AGENT_FILES]


def build_rootfs(cache: Path, base: Path, base_key: str, out: Path) -> Path:
    sources = agent_sources()
    key = sha256_of([BUILD_FORMAT, base_key, *(f"{rel}\0" for rel, _ in sources), *(data for _, data in sources)])
    target = out / f"rootfs-{key}.erofs"
    if target.exists():
        step(f"rootfs up to date ({target.name})")
        return target
    step(f"rootfs: base + agent ({len(sources)} files) -> erofs")
    stage = cache / f"stage-{key}"
    shutil.rmtree(stage, ignore_errors=True)
    run(["cp", "-al", str(base), str(stage)])
    try:
        (stage / ".done").unlink(missing_ok=True)
        agent_root = stage / "opt/uvmshim"
        for rel, data in sources:
            p = agent_root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        run([sys.executable, "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash",
             "-s", str(stage), "-p", "/", str(agent_root)])
        tmp = target.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        # -T0: fixed timestamps, so the same inputs give the same bytes.
        run(["mkfs.erofs", "--quiet", "-T0", "--all-root", str(tmp), str(stage)])
        atomic_publish(tmp, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def prune(out: Path, keep: set[str]) -> None:
    for p in out.iterdir():
        if p.name != "manifest.json" and p.name not in keep:
            p.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--cache", type=Path, default=HERE / "cache")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("image build: run as root (apt-get download, chroot smoke test)")
    t0 = time.monotonic()
    out, cache = args.out.resolve(), args.cache.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    ktree, kver, kkey = kernel_tree(cache)
    vmlinux = build_vmlinux(ktree, kver, kkey, out)
    base, base_key = build_base(cache, ktree, kver, kkey)
    busybox = base / "usr/bin/busybox"
    initramfs = build_initramfs(ktree, kver, busybox, out, kkey)
    rootfs = build_rootfs(cache, base, base_key, out)
    manifest = {
        "kernel": vmlinux.name,
        "initrd": initramfs.name,
        "rootfs": rootfs.name,
        "kernel_release": kver,
        "id": sha256_of([vmlinux.name, initramfs.name, rootfs.name]),
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / "manifest.json")
    prune(out, {vmlinux.name, initramfs.name, rootfs.name})
    for p in cache.iterdir():  # stale extracted trees from older inputs
        if re.match(r"(kernel|base|stage)-", p.name) and p not in (ktree, base):
            shutil.rmtree(p, ignore_errors=True)
    step(f"done in {time.monotonic() - t0:.1f}s: {out / 'manifest.json'} (image {manifest['id']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
