"""Progress bars on long host work: on a terminal (or asked for), never in pipes, tests or small calls."""

import io
import sys

import numpy as np
import pytest

import ltjax
from ltjax import _progress
from ltjax.cli import main


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _tree(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return {f"block{i}": {"kernel": rng.standard_normal((64, 96)).astype(np.float32)} for i in range(n)}


@pytest.fixture
def eager(monkeypatch):
    """Bars print at once and at every step (the test's work is short)."""
    monkeypatch.setattr(_progress, "AUTO_DELAY_S", 0.0)
    monkeypatch.setattr(_progress, "MIN_INTERVAL_S", 0.0)


def test_progress_true_draws_on_stderr(tmp_path, capfd, eager):
    tree = _tree(seed=1)
    out = ltjax.compress_tree(tree, ltjax.Policy(codec="int8"), progress=True)
    err = capfd.readouterr().err
    assert "ltjax.compress_tree" in err and "/kernel" in err
    assert f"/{12 * 64 * 96 * 4 // 1024}k" in err  # the total, in KiB
    ltjax.analyze(tree, progress=True)
    err = capfd.readouterr().err
    assert "ltjax.analyze" in err and "/kernel" in err
    ltjax.save(tmp_path / "m.lt", out, progress=True)
    err = capfd.readouterr().err
    assert "ltjax.save: checksums" in err and "ltjax.save: writing" in err and "/kernel" in err
    back = ltjax.load(tmp_path / "m.lt", progress=True)
    err = capfd.readouterr().err
    assert "ltjax.load: verifying" in err and "ltjax.load: to device" in err and "/kernel" in err
    assert ltjax.verify(tmp_path / "m.lt", progress=True)["compressed"] == 12
    assert "ltjax.verify" in capfd.readouterr().err
    np.testing.assert_array_equal(np.asarray(back["block5"]["kernel"].codes), np.asarray(out["block5"]["kernel"].codes))


def test_default_is_quiet_off_a_terminal(tmp_path, capfd, eager):
    tree = _tree(seed=2)  # large enough for auto mode, but stderr is not a terminal here
    out = ltjax.compress_tree(tree, ltjax.Policy(codec="int8"))
    ltjax.analyze(tree)
    ltjax.save(tmp_path / "m.lt", out)
    ltjax.load(tmp_path / "m.lt")
    ltjax.verify(tmp_path / "m.lt")
    assert capfd.readouterr().err == ""


def test_auto_mode_turns_on_at_a_terminal_for_large_work_only(tmp_path, monkeypatch, eager):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    ltjax.compress_tree(_tree(n=3, seed=3), ltjax.Policy(codec="int8"))  # a handful of small leaves: silent
    assert term.getvalue() == ""
    ltjax.compress_tree(_tree(seed=3), ltjax.Policy(codec="int8"), progress=False)  # explicitly off
    assert term.getvalue() == ""
    ltjax.compress_tree(_tree(seed=3), ltjax.Policy(codec="int8"))
    assert "ltjax.compress_tree" in term.getvalue() and "/kernel" in term.getvalue()
    # the CLI's compress gets the bar through compress_tree and save; its stdout stays clean
    np.savez(tmp_path / "m.npz", **{f"w{i}": w["kernel"] for i, w in enumerate(_tree(seed=4).values())})
    term.seek(0), term.truncate()
    assert main(["compress", str(tmp_path / "m.npz"), "-o", str(tmp_path / "m.lt"), "--codec", "int8", "--json"]) == 0
    assert "ltjax.compress_tree" in term.getvalue() and "ltjax.save" in term.getvalue()


def test_auto_mode_waits_before_drawing(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    ltjax.compress_tree(_tree(seed=5), ltjax.Policy(codec="int8"))  # well under the 1 s delay
    assert term.getvalue() == ""


def test_bad_progress_value_is_named():
    with pytest.raises(ValueError, match=r"progress='yes' must be None \(auto: on a terminal\), True or False"):
        ltjax.compress_tree(_tree(n=1), progress="yes")
