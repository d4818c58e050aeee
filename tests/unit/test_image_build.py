"""images/build.py's kernel rewrite: zero pages become bss, the loaded memory image stays byte for byte."""

from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path
from types import ModuleType

import pytest

PAGE = 4096


def load_build() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "images" / "build.py"
    spec = importlib.util.spec_from_file_location("image_build", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("image_build", module)
    spec.loader.exec_module(module)
    return module


build = load_build()
PHDR = struct.Struct("<IIQQQQQQ")
PT_LOAD, PT_NOTE = 1, 4


def make_elf(segments: list[tuple[int, bytes, int]], note_at: tuple[int, int]) -> bytes:
    """A 64-bit ELF: segments of (paddr, file bytes, memsz) each at a 2 MiB-aligned file offset, a note
    at (segment index, offset in it), and a section header table behind it all (dropped by the rewrite)."""
    phnum = len(segments) + 1
    phdrs, body, offset = [], b"", 0x200000
    offsets = []
    for paddr, data, memsz in segments:
        body += bytes(offset - 64 - phnum * PHDR.size - len(body)) + data
        phdrs.append(PHDR.pack(PT_LOAD, 5, offset, 0xFFFFFFFF80000000 + paddr, paddr, len(data), memsz, 0x200000))
        offsets.append(offset)
        offset = (offset + len(data) + 0x1FFFFF) & ~0x1FFFFF
    seg, at = note_at
    phdrs.append(PHDR.pack(PT_NOTE, 4, offsets[seg] + at, 0, segments[seg][0] + at, 24, 24, 4))
    shoff = 64 + phnum * PHDR.size + len(body)
    head = bytearray(64)
    head[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", head, 0x20, 64)
    struct.pack_into("<Q", head, 0x28, shoff)
    struct.pack_into("<HHHH", head, 0x36, PHDR.size, phnum, 64, 1)
    return bytes(head) + b"".join(phdrs) + body + bytes(64)


def memory_image(elf: bytes) -> tuple[bytes, bytes, bytes]:
    """What a loader puts in guest RAM (file bytes, then zeros up to memsz), which bytes it sets, and the note."""
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phnum, = struct.unpack_from("<H", elf, 0x38)
    ram, covered = bytearray(1 << 23), bytearray(1 << 23)
    note = b""
    for i in range(phnum):
        ptype, _, offset, _, paddr, filesz, memsz, _ = PHDR.unpack_from(elf, phoff + i * PHDR.size)
        if ptype == PT_LOAD:
            assert filesz <= memsz and offset + filesz <= len(elf)
            assert not any(covered[paddr:paddr + memsz]), "segments overlap"
            ram[paddr:paddr + filesz] = elf[offset:offset + filesz]
            covered[paddr:paddr + memsz] = b"\1" * memsz
        elif ptype == PT_NOTE:
            note = elf[offset:offset + filesz]
    return bytes(ram), bytes(covered), note


def test_zero_runs_become_bss_and_the_loaded_bytes_are_the_same() -> None:
    text = b"T" * (3 * PAGE) + bytes(20 * PAGE) + b"R" * (PAGE + 100)  # a padding run inside, an unaligned end
    data = b"D" * (2 * PAGE) + bytes(5 * PAGE) + b"d" * PAGE + bytes(40 * PAGE)  # a short run, then bss in the file
    elf = make_elf([(0x100000, text, len(text)), (0x400000, data, len(data) + 8 * PAGE)], note_at=(0, 3 * PAGE + 20 * PAGE + 8))
    out = build.zero_pages_as_bss(elf)
    ram_in, covered_in, note_in = memory_image(elf)
    ram_out, covered_out, note_out = memory_image(out)
    assert note_out == note_in == b"R" * 24
    assert covered_out == covered_in  # the same guest bytes are set, to the same values (zeros now from memsz)
    assert ram_out == ram_in
    loads = [PHDR.unpack_from(out, 64 + i * PHDR.size) for i in range(struct.unpack_from("<H", out, 0x38)[0])]
    assert [(p[4], p[5], p[6]) for p in loads if p[0] == PT_LOAD] == [
        (0x100000, 3 * PAGE, 23 * PAGE), (0x100000 + 23 * PAGE, PAGE + 100, PAGE + 100),
        (0x400000, 8 * PAGE, len(data) + 8 * PAGE)]  # the 5-page run is too short to split on
    assert struct.unpack_from("<QH", out, 0x28)[0] == 0  # no section headers
    assert len(out) < 20 * PAGE < len(elf)


def test_what_is_not_a_little_endian_64_bit_elf_is_refused() -> None:
    with pytest.raises(SystemExit, match="not a little-endian 64-bit ELF"):
        build.zero_pages_as_bss(b"\x7fELF\x01\x01" + bytes(100))
