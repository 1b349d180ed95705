"""The base helpers every layer shares: the atomic writer, the secret scrubber, the safe-name rule."""

import os
import stat

import pytest

from pipeline.atomic import atomic_write
from pipeline.errors import ConfigError
from pipeline.models.checkpoint import CONFIG_NAME, WEIGHTS_NAME, save_checkpoint
from pipeline.names import check_name, safe_name
from pipeline.scrub import redact, redact_uri, scrub


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_commits_whole_files_with_umask_permissions(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    atomic_write(target, lambda f: f.write(b"first"))
    assert target.read_bytes() == b"first"
    umask = os.umask(0)
    os.umask(umask)
    assert _mode(target) == 0o666 & ~umask  # not mkstemp's 0600

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"first"  # the old file, whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]  # no temp file left


def test_checkpoints_go_through_the_atomic_writer(tmp_path):
    import torch

    model = torch.nn.Linear(2, 3)
    folder = save_checkpoint(tmp_path / "ck", model, {"arch": "linear"}, {"note": "x"})
    umask = os.umask(0)
    os.umask(umask)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        assert _mode(folder / name) == 0o666 & ~umask
    assert sorted(p.name for p in folder.iterdir()) == sorted([WEIGHTS_NAME, CONFIG_NAME])


def test_scrub_masks_given_and_environment_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value")
    text = "failed with key=given-secret and env-secret-value; abc stays"
    out = scrub(text, ["given-secret", "abc"])  # shorter than 4 characters: never masked
    assert out == "failed with key=*** and ***; abc stays"
    # The longer secret first, so that one containing another is masked whole.
    assert scrub("token supersecret", ["secret", "supersecret"]) == "token ***"


def test_redact_hides_secret_options_and_url_passwords():
    options = {"key": "AKIA1234", "client_kwargs": {"endpoint_url": "http://user:pw@host:9000/x", "region_name": "r"},
               "session_token": "t0k3n"}
    assert redact(options) == {"key": "***", "session_token": "***",
                               "client_kwargs": {"endpoint_url": "http://***@host:9000/x", "region_name": "r"}}
    assert redact_uri("s3://bucket/prefix") == "s3://bucket/prefix"


def test_safe_name_keeps_letters_digits_and_dot_plus_minus_underscore():
    assert safe_name("rdc-optimal+lm_0.5") == "rdc-optimal+lm_0.5"
    assert safe_name("a/b c:d") == "a_b_c_d"
    assert safe_name(0.031) == "0.031"


@pytest.mark.parametrize("name", ["run\n", "\nrun", "run\r", "a b", "a/b", ".", "..", "", "r" * 101, 7])
def test_check_name_refuses_whole_strings_outside_the_rule(name):
    with pytest.raises(ConfigError, match="run_id: expected 1-100 characters of letters"):
        check_name(name, "run_id")


def test_check_name_and_safe_name_agree_on_the_characters():
    allowed = "".join(chr(c) for c in range(32, 127) if safe_name(chr(c)) == chr(c))
    assert allowed == "+-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
    assert check_name(allowed, "name") == allowed


def test_machine_reads_the_processor_name_and_flags_lines(tmp_path):
    from pipeline import machine

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n\n"
                    "processor\t: 1\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    assert machine.cpu_flags(str(info)) == {"fpu", "avx512f", "amx_bf16", "amx_tile"}
    assert machine.processor_name(str(info)) == "Some CPU @ 2.0GHz"
    missing = str(tmp_path / "missing")
    assert machine.cpu_flags(missing) == frozenset()
    assert machine.processor_name(missing)  # platform's name where there is no cpuinfo


def test_processor_facts_are_read_only_in_the_machine_module():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "pipeline"
    readers = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                     if "/proc/cpuinfo" in p.read_text(encoding="utf-8") or "platform.processor" in p.read_text(encoding="utf-8"))
    assert readers == ["machine.py"]
