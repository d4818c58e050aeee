"""schemas.shim_options: the shim's TOML file, strict (unknown keys and bad values named), and where it is found."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas import shim_options
from schemas.shim_options import OptionsError, ShimOptions, find_config, load_options


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_no_file_means_defaults() -> None:
    options = load_options(None)
    assert options == ShimOptions()
    assert (options.log_level, options.stop_grace_s, options.uvm) == ("info", 10.0, {})


def test_valid_file(tmp_path: Path) -> None:
    path = write(tmp_path, """
log_level = "debug"
stop_grace_s = 2.5

[uvm]
cpus = 2
memory_mib = 512
accel = "tcg"
image = "/srv/uvmshim/images"
boot_timeout = 30
backend = "libvirt"
""")
    options = load_options(path)
    assert options.log_level == "debug"
    assert options.stop_grace_s == 2.5
    assert options.uvm == {"cpus": 2, "memory_mib": 512, "accel": "tcg", "image": "/srv/uvmshim/images",
                           "boot_timeout": 30, "backend": "libvirt"}


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_options(write(tmp_path, "")) == ShimOptions()


@pytest.mark.parametrize(("text", "named"), [
    ("colour = 1\n", "colour"),
    ("[uvm]\ngpu = 1\n", "gpu"),
    ("[uvm]\nid = \"mine\"\n", "id"),  # ids come from the task, never from the file
    ("[uvm]\nrun_dir = \"/x\"\n", "run_dir"),
    ("[uvm]\ncpus = 0\n", "uvm.cpus"),
    ("[uvm]\naccel = \"fast\"\n", "uvm.accel"),
    ("[uvm]\nmemory_mib = \"lots\"\n", "uvm.memory_mib"),
    ("log_level = \"loud\"\n", "log_level"),
    ("stop_grace_s = 0\n", "stop_grace_s"),
    ("uvm = 5\n", "uvm"),
])
def test_bad_key_or_value_is_named_with_the_file(tmp_path: Path, text: str, named: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(OptionsError) as info:
        load_options(path)
    message = str(info.value)
    assert message.startswith(f"config {path}: ")
    assert named in message


def test_unknown_uvm_key_lists_the_allowed_ones(tmp_path: Path) -> None:
    with pytest.raises(OptionsError, match=r"unknown key\(s\) gpu; allowed: .*cpus"):
        load_options(write(tmp_path, "[uvm]\ngpu = 1\n"))


def test_uvm_value_error_names_the_key_on_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[uvm]\ncpus = 0\n")
    with pytest.raises(OptionsError) as info:
        load_options(path)
    assert str(info.value) == f"config {path}: uvm.cpus: Input should be greater than or equal to 1"


def test_not_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "this is [not toml\n")
    with pytest.raises(OptionsError, match="not valid TOML") as info:
        load_options(path)
    assert str(path) in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(OptionsError, match="not valid TOML") as info:
        load_options(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(OptionsError, match="cannot read: No such file or directory") as info:
        load_options(path)
    assert str(path) in str(info.value)


def test_options_error_is_a_value_error() -> None:
    assert issubclass(OptionsError, ValueError)


def test_uvm_config_merges_task_fields(tmp_path: Path) -> None:
    options = load_options(write(tmp_path, "[uvm]\ncpus = 2\nmemory_mib = 512\naccel = \"tcg\"\n"))
    config = options.uvm_config(id="ns.task1", run_dir=tmp_path / "run", console_log=tmp_path / "console.log")
    assert (config.id, config.cpus, config.memory_mib, config.accel) == ("ns.task1", 2, 512, "tcg")
    assert config.run_dir == tmp_path / "run"
    assert config.console_log == tmp_path / "console.log"


def test_uvm_config_task_fields_win_over_the_file() -> None:
    assert ShimOptions(uvm={"cpus": 2}).uvm_config(id="t", cpus=3).cpus == 3


def test_options_are_frozen() -> None:
    options = ShimOptions()
    with pytest.raises(ValueError):
        options.log_level = "debug"  # type: ignore[misc]


# -- find_config -----------------------------------------------------------------------------------------


@pytest.fixture
def default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private stand-in for /etc/uvmshim/config.toml (absent until a test writes it); no $UVMSHIM_CONFIG."""
    path = tmp_path / "etc" / "config.toml"
    monkeypatch.setattr(shim_options, "DEFAULT_PATH", path)
    monkeypatch.delenv("UVMSHIM_CONFIG", raising=False)
    return path


def test_find_config_nothing_configured(default_path: Path) -> None:
    assert find_config(None) is None
    assert find_config("") is None


def test_find_config_default_when_it_exists(default_path: Path) -> None:
    default_path.parent.mkdir()
    default_path.write_text("")
    assert find_config(None) == default_path


def test_find_config_env_beats_default(default_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default_path.parent.mkdir()
    default_path.write_text("")
    monkeypatch.setenv("UVMSHIM_CONFIG", str(tmp_path / "env.toml"))
    assert find_config(None) == tmp_path / "env.toml"


def test_find_config_explicit_beats_env_and_default(default_path: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    default_path.parent.mkdir()
    default_path.write_text("")
    monkeypatch.setenv("UVMSHIM_CONFIG", str(tmp_path / "env.toml"))
    assert find_config(str(tmp_path / "explicit.toml")) == tmp_path / "explicit.toml"


def test_find_config_empty_env_is_ignored(default_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UVMSHIM_CONFIG", "")
    assert find_config(None) is None


def test_find_config_does_not_check_that_explicit_or_env_files_exist(default_path: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A named file that is missing is load_options' error to report, with its name."""
    monkeypatch.setenv("UVMSHIM_CONFIG", str(tmp_path / "missing.toml"))
    path = find_config(None)
    assert path == tmp_path / "missing.toml"
    with pytest.raises(OptionsError, match="missing.toml"):
        load_options(path)
