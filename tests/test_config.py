"""ltjax._config: every environment variable in one place, read once, and the README's table of them."""

import dataclasses
import re
from pathlib import Path

import pytest

from ltjax import _config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(monkeypatch):
    """Sets LTJAX_* variables for one test; `settings()` rereads them, and again after the test."""
    for name in _config.VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def set_(**values):
        for k, v in values.items():
            monkeypatch.setenv(k, v)
        _config.settings.cache_clear()
        return _config.settings()

    yield set_
    monkeypatch.undo()
    _config.settings.cache_clear()


def readme_table() -> dict[str, str]:
    """``{variable: what it does}`` of README.md's "Configuration" table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\| `(LTJAX_\w+)` \| (.*) \|$", section, re.M)}


def test_readme_lists_every_variable_as_the_code_does():
    assert readme_table() == {name: what for name, (_, what) in _config.VARIABLES.items()}


def test_every_variable_has_its_own_settings_field():
    fields = {f.name for f in dataclasses.fields(_config.Settings)}
    assert sorted(field for field, _ in _config.VARIABLES.values()) == sorted(fields)


def test_readme_points_at_the_experimental_knobs():
    section = (ROOT / "README.md").read_text().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    assert "ltjax._config.EXPERIMENTAL" in section
    assert _config.EXPERIMENTAL and all(isinstance(v, str) and v for v in _config.EXPERIMENTAL.values())


def test_nothing_else_reads_the_environment():
    """One module reads the environment: no other ltjax source calls os.environ / getenv."""
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "ltjax").rglob("*.py")
                 if p != ROOT / "ltjax" / "_config.py" and re.search(r"os\.environ|getenv\(", p.read_text())]
    assert offenders == []


def test_unset_means_default(env):
    s = env()
    assert s == _config.Settings(pallas_interpret=None, pallas_tuned=None, cuda_gemv=False, disable_ffi=False,
                                 ffi_isa=None, ffi_vnni=None, ffi_amx=None, ffi_threads=None, ffi_spin_us=None)


@pytest.mark.parametrize("value,want", [("1", True), ("true", True), ("Yes", True), (" on ", True),
                                        ("0", False), ("false", False), ("NO", False), ("off", False), ("", None)])
def test_flags(env, value, want):
    s = env(LTJAX_PALLAS_INTERPRET=value, LTJAX_FFI_VNNI=value, LTJAX_CUDA_GEMV=value)
    assert s.pallas_interpret is want and s.ffi_vnni is want
    assert s.cuda_gemv is bool(want)  # opt-in flags: unset is off


def test_ints_and_strings(env):
    s = env(LTJAX_FFI_THREADS="3", LTJAX_FFI_SPIN_US=" 0 ", LTJAX_FFI_ISA="AVX2", LTJAX_PALLAS_TUNED=" /t/x.json ")
    assert (s.ffi_threads, s.ffi_spin_us, s.ffi_isa, s.pallas_tuned) == (3, 0, "avx2", "/t/x.json")


@pytest.mark.parametrize("name,value,match", [
    ("LTJAX_DISABLE_FFI", "maybe", r"\$LTJAX_DISABLE_FFI='maybe': use 1 or 0"),
    ("LTJAX_FFI_AMX", "2", r"\$LTJAX_FFI_AMX='2': use 1 or 0"),
    ("LTJAX_FFI_THREADS", "four", r"\$LTJAX_FFI_THREADS='four' is not an integer"),
    ("LTJAX_FFI_SPIN_US", "-5", r"\$LTJAX_FFI_SPIN_US='-5' must be >= 0"),
    ("LTJAX_FFI_ISA", "sse2", r"\$LTJAX_FFI_ISA='sse2': choose 'avx2' or 'avx512'"),
])
def test_bad_values_are_errors_that_name_the_variable(env, name, value, match):
    with pytest.raises(ValueError, match=match):
        env(**{name: value})


def test_read_once(env, monkeypatch):
    assert env(LTJAX_FFI_THREADS="2").ffi_threads == 2
    monkeypatch.setenv("LTJAX_FFI_THREADS", "7")
    assert _config.settings().ffi_threads == 2  # until cache_clear()
    _config.settings.cache_clear()
    assert _config.settings().ffi_threads == 7
