"""UvmConfig (host-independent checks) and uvm.builder.build() (checks against this host)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from schemas.uvm_config import UvmConfig
from uvm import builder
from uvm.errors import ConfigError
from uvm.testing import make_test_config


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """An image directory with a manifest naming three tiny files."""
    d = tmp_path / "img"
    d.mkdir()
    for name in ("vmlinux-1", "initrd-1.cpio", "rootfs-1.erofs"):
        (d / name).write_bytes(b"\0" * 8)
    (d / "manifest.json").write_text(json.dumps(
        {"id": "img-1", "kernel": "vmlinux-1", "initrd": "initrd-1.cpio", "rootfs": "rootfs-1.erofs"}))
    return d


def config(tmp_path: Path, **kw: Any) -> UvmConfig:
    kw.setdefault("id", "vm1")
    kw.setdefault("accel", "tcg")
    kw.setdefault("memory_mib", 64)
    kw.setdefault("run_dir", tmp_path / "run")
    kw.setdefault("state_dir", tmp_path / "state")
    return UvmConfig(**kw)


# -- UvmConfig ---------------------------------------------------------------------------------------


def test_defaults_are_valid_and_ids_are_fresh() -> None:
    a, b = UvmConfig(), UvmConfig()
    assert a.id != b.id and a.id.startswith("uvm-")
    assert (a.cpus, a.memory_mib, a.accel, a.backend) == (1, 256, "auto", "qemu")


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(ValidationError, match="memory_mb"):
        UvmConfig(memory_mb=512)  # type: ignore[call-arg]


def test_config_is_frozen() -> None:
    cfg = UvmConfig(id="vm1")
    with pytest.raises(ValidationError):
        cfg.cpus = 4  # type: ignore[misc]


@pytest.mark.parametrize("memory_mib", [0, -1, -256, 63, (1 << 20) + 1])
def test_memory_out_of_range_is_rejected(memory_mib: int) -> None:
    with pytest.raises(ValidationError, match="memory_mib"):
        UvmConfig(memory_mib=memory_mib)


@pytest.mark.parametrize("cpus", [0, -1, 65])
def test_cpus_out_of_range_is_rejected(cpus: int) -> None:
    with pytest.raises(ValidationError, match="cpus"):
        UvmConfig(cpus=cpus)


@pytest.mark.parametrize("vm_id", ["../x", "a/b", "", "-x", ".x", "_x", "..", "a b", "a\0b", "é", "x" * 65, "/abs"])
def test_bad_ids_are_rejected(vm_id: str) -> None:
    with pytest.raises(ValidationError, match="not a valid VM id"):
        UvmConfig(id=vm_id)


@pytest.mark.parametrize("vm_id", ["a", "vm1", "A.b-c_d", "0" * 64, "uvm-deadbeef"])
def test_good_ids_are_accepted(vm_id: str) -> None:
    assert UvmConfig(id=vm_id).id == vm_id


def test_id_with_trailing_newline_is_rejected() -> None:
    with pytest.raises(ValidationError, match="not a valid VM id"):
        UvmConfig(id="vm1\n")


@pytest.mark.parametrize("accel", ["xen", "KVM", "", "hvf"])
def test_bad_accel_is_rejected(accel: str) -> None:
    with pytest.raises(ValidationError, match="accel"):
        UvmConfig(accel=accel)


@pytest.mark.parametrize("args", ["a\nb", "a\0b"])
def test_multi_line_kernel_args_are_rejected(args: str) -> None:
    with pytest.raises(ValidationError, match="kernel_args must be one line"):
        UvmConfig(kernel_args=args)


@pytest.mark.parametrize(("field", "value"), [("boot_timeout", 0), ("boot_timeout", -1), ("tb_size_mib", 8),
                                              ("backend", "libvirt-xyz"), ("kernel_args", "x" * 2049)])
def test_other_ranges_are_checked(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        UvmConfig(**{field: value})


# -- builder: image files ------------------------------------------------------------------------------


def test_build_from_manifest(tmp_path: Path, image: Path) -> None:
    spec = builder.build(config(tmp_path, image=image))
    assert spec.kernel == image / "vmlinux-1"
    assert spec.initrd == image / "initrd-1.cpio"
    assert spec.rootfs == image / "rootfs-1.erofs"
    assert spec.image_id == "img-1"
    assert spec.vm_id == "vm1"
    assert spec.run_dir == (tmp_path / "run" / "vm1").absolute()
    assert spec.kernel.is_absolute()


def test_per_file_overrides_need_no_manifest(tmp_path: Path) -> None:
    cfg = make_test_config(tmp_path, image=tmp_path / "no-such-image")
    spec = builder.build(cfg)
    assert spec.image_id == "custom"
    assert spec.kernel == cfg.kernel


@pytest.mark.parametrize("which", ["kernel", "initrd", "rootfs"])
def test_missing_image_file_names_the_path(tmp_path: Path, image: Path, which: str) -> None:
    missing = tmp_path / f"missing-{which}"
    with pytest.raises(ConfigError) as info:
        builder.build(config(tmp_path, image=image, **{which: missing}))
    assert str(info.value) == f"{which} {missing}: not found (build the guest image with `make image`)"
    assert info.value.context["path"] == str(missing)


@pytest.mark.parametrize("which", ["kernel", "initrd", "rootfs"])
def test_directory_instead_of_file_names_the_path(tmp_path: Path, image: Path, which: str) -> None:
    d = tmp_path / f"dir-{which}"
    d.mkdir()
    with pytest.raises(ConfigError, match=rf"^{which} {d}: not a regular file$"):
        builder.build(config(tmp_path, image=image, **{which: d}))


def test_file_named_by_the_manifest_missing(tmp_path: Path, image: Path) -> None:
    (image / "initrd-1.cpio").unlink()
    with pytest.raises(ConfigError, match=rf"initrd {image / 'initrd-1.cpio'}: not found"):
        builder.build(config(tmp_path, image=image))


def test_missing_manifest_names_the_image(tmp_path: Path) -> None:
    empty = tmp_path / "empty-image"
    empty.mkdir()
    with pytest.raises(ConfigError, match=rf"image {empty}: no manifest.json") as info:
        builder.build(config(tmp_path, image=empty))
    assert info.value.context["path"] == str(empty)


def test_missing_manifest_when_only_some_files_are_given(tmp_path: Path) -> None:
    cfg = make_test_config(tmp_path, image=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="no manifest.json"):
        builder.build(cfg.model_copy(update={"rootfs": None}))


@pytest.mark.parametrize("manifest", [
    {"kernel": "vmlinux-1", "initrd": "initrd-1.cpio"},
    {"kernel": "vmlinux-1", "initrd": "initrd-1.cpio", "rootfs": 3},
    [],
    "kernel",
])
def test_manifest_without_the_names(tmp_path: Path, image: Path, manifest: object) -> None:
    (image / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=rf"image {image / 'manifest.json'}: manifest lacks kernel/initrd/rootfs"):
        builder.build(config(tmp_path, image=image))


def test_unparsable_manifest(tmp_path: Path, image: Path) -> None:
    (image / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match=rf"image {image / 'manifest.json'}: unreadable manifest"):
        builder.build(config(tmp_path, image=image))


# -- builder: host resources ---------------------------------------------------------------------------


def test_memory_above_host_memtotal_is_rejected(tmp_path: Path) -> None:
    total = builder.host_memory_mib()
    assert total > 0
    if total + 1 > 1 << 20:
        pytest.skip("this host has more memory than a config can ask for")
    with pytest.raises(ConfigError, match=rf"memory_mib {total + 1}: more than this host has \({total} MiB\)") as info:
        builder.build(make_test_config(tmp_path, memory_mib=total + 1))
    assert info.value.context == {"memory_mib": total + 1}


def test_memory_check_uses_memtotal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builder, "host_memory_mib", lambda: 512)
    assert builder.build(make_test_config(tmp_path, memory_mib=512)).memory_mib == 512
    with pytest.raises(ConfigError, match="memory_mib 513"):
        builder.build(make_test_config(tmp_path, memory_mib=513))


def test_too_long_run_dir_is_rejected(tmp_path: Path) -> None:
    long_dir = tmp_path / ("d" * 100)
    with pytest.raises(ConfigError, match="run_dir .*too long for the unix sockets"):
        builder.build(make_test_config(tmp_path, run_dir=long_dir))


# -- builder: accelerator-dependent choices -------------------------------------------------------------


def test_tcg_adds_tsc_early_khz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builder, "host_tsc_khz", lambda: 2_400_000)
    spec = builder.build(make_test_config(tmp_path, accel="tcg", tb_size_mib=64, kernel_args="init=/x"))
    assert spec.accel == "tcg"
    assert spec.cmdline.startswith(builder.BASE_CMDLINE)
    assert spec.cmdline.split()[-4:] == ["tsc_early_khz=2400000", "lockdown=confidentiality", "uvm.id=vm1", "init=/x"]
    assert spec.cpu_model == "qemu64"
    assert spec.tb_size_mib == 64


@pytest.mark.parametrize("level", ["confidentiality", "integrity", "none"])
def test_guest_lockdown_on_the_command_line(tmp_path: Path, level: str) -> None:
    spec = builder.build(make_test_config(tmp_path, guest_lockdown=level))
    words = spec.cmdline.split()
    assert [w for w in words if w.startswith("lockdown=")] == ([] if level == "none" else [f"lockdown={level}"])


def test_tcg_with_the_real_host_tsc(tmp_path: Path) -> None:
    spec = builder.build(make_test_config(tmp_path, accel="tcg"))
    khz = builder.host_tsc_khz()
    if khz is None:
        assert "tsc_early_khz" not in spec.cmdline
    else:
        assert f" tsc_early_khz={khz} " in spec.cmdline


def test_kvm_uses_host_cpu_and_no_tsc_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builder, "host_tsc_khz", lambda: 2_400_000)
    spec = builder.build(make_test_config(tmp_path, accel="kvm", tb_size_mib=64))
    assert spec.accel == "kvm"
    assert spec.cpu_model == "host"
    assert "tsc_early_khz" not in spec.cmdline
    assert spec.tb_size_mib is None  # a TCG-only setting


def test_explicit_accel_never_probes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_probe(*args: object, **kw: object) -> tuple[bool, str]:
        raise AssertionError("probe_kvm must not run for an explicit accel")

    monkeypatch.setattr("uvm.accel.probe_kvm", no_probe)
    assert builder.build(make_test_config(tmp_path, accel="kvm")).accel == "kvm"
    assert builder.build(make_test_config(tmp_path, accel="tcg")).accel == "tcg"


def test_spec_carries_the_config(tmp_path: Path) -> None:
    cfg = make_test_config(tmp_path, cpus=2, memory_mib=128, qemu_binary="/opt/qemu", kill_with_parent=False,
                           console_log=tmp_path / "console.log")
    spec = builder.build(cfg)
    assert (spec.cpus, spec.memory_mib, spec.qemu_binary, spec.kill_with_parent) == (2, 128, "/opt/qemu", False)
    assert spec.console_log == (tmp_path / "console.log").absolute()
    assert spec.agent_port_name == "uvmshim.agent"


def test_unbalanced_quotes_in_kernel_args_raise_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kernel_args"):
        builder.build(make_test_config(tmp_path, kernel_args='init="/bin/sh'))
