"""Every command line the project documents, checked as documented.

Sources: README.md, benchmarks/README.md, models/README.md, docs/*.md (fenced shell blocks and
inline code), the docstrings of the command-line modules, the ``--help`` text of every command
found (``ltjax --help`` and each subcommand's, ``python -m X --help``), the Makefile's recipes
and benchmarks/gpu_check.sh. Each command is expanded (``[--json]``: with and without;
``auto|raw``: each alternative; ``NAME``, ``E``, ``DIR``: a real value) and then

* ``ltjax analyze|compress|inspect|verify|info ...``: run for real, in-process, on small files
  made here; one of them through the installed ``ltjax`` console script;
* ``ltjax bench ...``: parsed by the harness's own parser (benchmark names must exist); the
  ``--quick --only <cheap>`` forms run for real (into a temp directory);
* ``python -m X ...`` / ``python path.py ...``: the module exists, runs as ``-m`` (a
  ``__main__`` block), and its own argument parser accepts the documented argv: the module is
  executed as ``__main__`` with ``argparse.ArgumentParser.parse_args`` stopping it right after a
  successful parse (so nothing expensive runs);
* ``make TARGET``: the target exists in the Makefile (and its recipe's commands are checked too);
* ``bash path.sh`` and test-file arguments: the files exist.

Every benchmark module must accept ``--quick`` and ``--out PATH`` (what ``ltjax bench`` passes).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import glob
import importlib.util
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "benchmarks/README.md", "models/README.md",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
OWN_PACKAGES = ("ltjax", "models", "benchmarks")
# Placeholders the docs use, and what a check substitutes for them ({tmp}: a temp directory).
METAVARS = {
    "E": "0.01", "N": "2", "NAME": "ffi_matmul", "PREFIX": "int8_matmul", "DIR": "{tmp}/dir",
    "OUTDIR": "{tmp}/outdir", "$OUT": "{tmp}/out", "PATH": "{tmp}/out.json", "OUT.so": "{tmp}/out.so",
    "OUT.json": "{tmp}/out.json", "RUN_DIR": "{tmp}/run", "B": "5", "T": "256",
}
CHEAP_BENCHMARKS = {"gemm_overhead", "ffi_matmul", "pack"}  # --quick: a few seconds each
SHELL_SEPARATORS = {"&&", "||", ";", "|"}


# ---------------------------------------------------------------------- extraction


def _code_spans(text: str) -> list[str]:
    """Shell-ish code of a markdown text: each line of a fenced block that is not Python, and
    each inline span (one that wraps a line break joined into one line)."""
    out = []
    def fence(m):
        if m.group(1).lower() not in ("python", "py", "json", "text"):
            out.extend(m.group(2).splitlines())
        return ""
    text = re.sub(r"```(\w*)\n(.*?)```", fence, text, flags=re.S)
    out += [" ".join(m.group(1).split()) for m in re.finditer(r"`([^`]+)`", text)]
    return out


def _text_lines(text: str) -> list[str]:
    """Command lines of a help text or docstring: a line that starts like a command, with the
    indented ``[...]`` lines that continue it."""
    out, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        if not line.startswith(" ") or _head(s) is None:  # usage lines are indented; prose is not
            continue
        j = i + 1
        while j < len(lines) and lines[j].strip().startswith("[") and lines[j].startswith(" "):
            s += " " + lines[j].strip()
            j += 1
        out.append(s)
    out += [" ".join(m.group(1).split()) for m in re.finditer(r"``([^`]+)``", text)]
    return out


def _head(s: str) -> str | None:
    words = s.split()
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    if not words:
        return None
    w = words[0]
    if w == "ltjax" and len(words) > 1:
        return "ltjax"
    if w in ("python", "python3") and len(words) > 1:
        return "python"
    if w == "make" and len(words) > 1:
        return "make"
    if w == "bash" or w.endswith(".sh"):
        return "sh"
    return None


def _split_commands(line: str) -> list[list[str]]:
    """Tokens of each command of a shell line (``a && b | c``), env assignments, ``export`` and
    ``timeout N`` dropped; only commands this project owns (ltjax, python, make, scripts)."""
    line = line.replace("…", "...")
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return []
    cmds, cur = [], []
    for t in tokens + [";"]:
        if t in SHELL_SEPARATORS:
            while cur and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", cur[0]):
                cur = cur[1:]
            if cur[:1] == ["timeout"]:
                cur = cur[2:]
            if cur and cur[0] != "export" and _head(" ".join(cur)):
                cmds.append(cur)
            cur = []
        else:
            cur.append(t)
    return cmds


def _module_docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def _cli_modules() -> list[Path]:
    """Modules with a command line: ``if __name__ == "__main__"`` in the project's packages."""
    out = []
    for pkg in OWN_PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            if '__name__ == "__main__"' in p.read_text():
                out.append(p)
    return out


def _shell_script_commands(path: Path) -> list[str]:
    """The ``"$PY" -m X ...`` lines of a shell script, continuations joined, its variables given
    smoke-run values."""
    text = path.read_text().replace("\\\n", " ")
    subst = {r'"\$\(cap [^)]*\)\)?"': "1", r"\$\{GPU_CHECK_SWEEP_ARGS:-\}": "", r"\$\{GPU_CHECK_DECODE_ARGS:-\}": "",
             r'"\$\{(PAR|KSEL|TESTS)\[@\]\}"': "",
             r"\$SIZES": "256", r"\$MS": "1 4", r'"\$REPS"': "2", r'"\$SWEEP_S"': "10", r'"\$OUT/': '"{tmp}/',
             r'"\$PY"': "python"}
    out = []
    for line in text.splitlines():
        if '"$PY" -m' not in line or "import" in line:
            continue
        for pat, rep in subst.items():
            line = re.sub(pat, rep, line)
        line = re.split(r"\s[12]?>|\s2>&1|\|", line)[0]  # drop redirections and pipes
        out.append(line.strip())
    return out


@functools.cache
def documented() -> tuple[tuple[str, str], ...]:
    """(source, command line) of every command the project documents."""
    found: list[tuple[str, str]] = []
    for doc in DOCS:
        for span in _code_spans((ROOT / doc).read_text()):
            for cmd in _split_commands(span):
                found.append((doc, shlex.join(cmd)))
    for p in _cli_modules():
        rel = str(p.relative_to(ROOT))
        for line in _text_lines(_module_docstring(p)):
            for cmd in _split_commands(line):
                found.append((f"{rel} docstring", shlex.join(cmd)))
    for line in _shell_script_commands(ROOT / "benchmarks/gpu_check.sh"):
        for cmd in _split_commands(line):
            found.append(("benchmarks/gpu_check.sh", shlex.join(cmd)))
    for target, recipe in _makefile().items():
        for line in recipe:
            line = line.replace("$(PY)", "python").replace("$(PYTHON)", "python")
            for cmd in _split_commands(line):
                found.append((f"Makefile ({target})", shlex.join(cmd)))
    return tuple(dict.fromkeys(found))


@functools.cache
def _makefile() -> dict[str, list[str]]:
    """Target -> recipe lines of the Makefile."""
    rules: dict[str, list[str]] = {}
    cur = None
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.$()/-]+)\s*:(?!=)", line)
        if m:
            cur = m.group(1)
            rules.setdefault(cur, [])
        elif line.startswith("\t") and cur:
            if not line.strip().startswith("@#"):
                rules[cur].append(line.strip().lstrip("@"))
        elif line.strip() and not line.startswith("#"):
            cur = None
    return rules


# ---------------------------------------------------------------------- expansion


def expand(argv: list[str], tmp: str) -> list[list[str]]:
    """Concrete argvs of a documented one: optional ``[...]`` groups all left out, all put in
    (and each alone, for up to 3 groups); each alternative of ``a|b``; metavars substituted;
    ``...`` dropped."""
    items: list[tuple[bool, list[str]]] = []  # (optional?, tokens)
    group = None
    for t in argv:
        if group is None and t.startswith("[") and len(t) > 1:
            group = []
            t = t[1:]
        if group is not None:
            end = t.endswith("]")
            group.append(t[:-1] if end else t)
            if end:
                items.append((True, [g for g in group if g]))
                group = None
        else:
            items.append((False, [t]))
    if group is not None:
        raise AssertionError(f"unclosed [ in {argv}")
    n_opt = sum(o for o, _ in items)
    picks = [set(), set(range(n_opt))]
    if n_opt <= 3:
        picks += [{i} for i in range(n_opt)]
    out = []
    for pick in picks:
        toks, k = [], 0
        for opt, ts in items:
            if opt:
                if k in pick:
                    toks += ts
                k += 1
            else:
                toks += ts
        toks = [t for t in toks if t not in ("...", "…")]
        alts = [i for i, t in enumerate(toks) if "|" in t and not t.startswith("-")]
        first = [t.split("|")[0] if i in alts else t for i, t in enumerate(toks)]
        variants = [first]
        for i in alts:  # one variant per alternative, the other tokens at their first
            for a in toks[i].split("|")[1:]:
                variants.append(first[:i] + [a] + first[i + 1:])
        for v in variants:
            v = [_metavar(t, tmp) for t in v]
            if v not in out:
                out.append(v)
    return out


def _metavar(t: str, tmp: str) -> str:
    if t in METAVARS:
        return METAVARS[t].format(tmp=tmp)
    if t.startswith("{tmp}"):
        return t.format(tmp=tmp)
    if re.fullmatch(r"[A-Z][A-Z_]*", t):
        raise AssertionError(f"placeholder {t!r}: add what it stands for to METAVARS")
    return t


# ---------------------------------------------------------------------- running


class _Parsed(Exception):
    """Raised by the patched ``parse_args`` once the real parser has accepted an argv."""


@contextlib.contextmanager
def _stop_after_parse():
    orig = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise _Parsed(orig(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_args):
        yield


def run_as_main(target: str, argv: list[str], *, script: bool = False) -> tuple[str, object, str]:
    """Executes module (or script) ``target`` as ``__main__`` with ``argv``, stopped right after its
    parser accepted the argv: ("parsed", namespace, output), or ("exit", code, output) where the
    parser refused it or printed help."""
    buf = io.StringIO()
    with (_stop_after_parse(), mock.patch.object(sys, "argv", [target, *argv]), contextlib.redirect_stdout(buf),
          contextlib.redirect_stderr(buf), warnings.catch_warnings()):
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules after import of package"
        try:
            if script:
                runpy.run_path(str(ROOT / target), run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        except _Parsed as e:
            return "parsed", e.args[0], buf.getvalue()
        except SystemExit as e:
            return "exit", e.code, buf.getvalue()
    raise AssertionError(f"{target} {argv}: ran without calling ArgumentParser.parse_args "
                         f"(output: {buf.getvalue()[-500:]})")


def _own(module: str) -> bool:
    return module.split(".")[0] in OWN_PACKAGES


def _check_module_source(module: str) -> None:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"no module {module!r}"
    if spec.submodule_search_locations is not None:  # a package: `python -m` runs its __main__
        spec = importlib.util.find_spec(f"{module}.__main__")
        assert spec is not None and spec.origin, f"package {module!r} has no __main__: `python -m {module}` fails"
    if _own(module):
        src = Path(spec.origin).read_text()
        assert '__name__ == "__main__"' in src, f"{module} has no __main__ block: `python -m {module}` does nothing"
        assert "parse_args(" in src, f"{module}: its command line is not an argparse parser, so it cannot be checked"


def _check_paths(argv: list[str]) -> None:
    """Arguments that name files of this repository (tests, scripts) exist."""
    for a in argv:
        if not a.startswith("-") and re.search(r"^(tests|benchmarks|models|ltjax|docs)/.*\.(py|sh|md)$", a):
            assert glob.glob(str(ROOT / a)), f"{a}: no such file"


def check_python(argv: list[str], tmp: str, where: str) -> None:
    """``python -m X ...`` or ``python path.py ...``."""
    if argv[0] == "-m":
        module, rest = argv[1], argv[2:]
        if module == "benchmarks.NAME":  # "each also runs alone as python -m benchmarks.NAME"
            from benchmarks.run import discover

            for name in discover():
                check_python(["-m", f"benchmarks.{name}", *rest], tmp, where)
            return
        _check_module_source(module)
        _check_paths(rest)
        if not _own(module):
            return
        kind, result, out = run_as_main(module, rest)
    else:
        script, rest = argv[0], argv[1:]
        assert (ROOT / script).is_file(), f"{where}: python {script}: no such file"
        assert "parse_args(" in (ROOT / script).read_text(), f"{script}: not an argparse command line"
        kind, result, out = run_as_main(script, rest, script=True)
    assert kind == "parsed", f"{where}: `python {shlex.join(argv)}` is refused by its parser (exit {result}):\n{out}"


@functools.cache
def _benchmark_names() -> tuple[str, ...]:
    from benchmarks.run import discover

    return tuple(discover())


def _ltjax_files(tmp: str) -> dict[str, str]:
    """A small .safetensors, .npz and ltjax file, by the names the docs use."""
    from safetensors.numpy import save_file

    import ltjax

    rng = np.random.default_rng(0)
    tensors = {"w": rng.standard_normal((64, 128)).astype(np.float32),
               "sparse": np.where(rng.random((128, 64)) < 0.6, 0, rng.standard_normal((128, 64))).astype(np.float32),
               "bias": np.zeros(128, np.float32)}
    files = {"model.safetensors": os.path.join(tmp, "model.safetensors"), "model.npz": os.path.join(tmp, "model.npz"),
             "model.lt": os.path.join(tmp, "model.lt")}
    save_file(tensors, files["model.safetensors"])
    np.savez(files["model.npz"], **tensors)
    ltjax.save(files["model.lt"], ltjax.compress_tree(tensors, ltjax.Policy(codec="int8")))
    return files


def check_ltjax(argv: list[str], tmp: str, where: str, capsys) -> None:
    from ltjax.cli import build_parser, main

    assert argv, f"{where}: bare `ltjax`"
    if argv[0] == "bench":
        bench = argv[1:]
        cheap = "--quick" in bench and "--only" in bench and set(_only(bench)) <= CHEAP_BENCHMARKS
        if "--list" in bench or cheap:  # cheap: run it, into a temp directory
            out = os.path.join(tmp, "bench")
            rc = main(["bench", *bench] + (["--out", out] if cheap else []))
            text = capsys.readouterr().out
            assert rc == 0, f"{where}: `ltjax {shlex.join(argv)}` exits {rc}:\n{text[-3000:]}"
            if cheap:
                run = json.loads(Path(out, "run.json").read_text())
                assert set(run["benchmarks"]) == set(_only(bench))
                assert all(e["status"] in ("ok", "skipped") for e in run["benchmarks"].values()), run["benchmarks"]
            else:
                assert all(n in text for n in _benchmark_names())
            return
        with _stop_after_parse(), pytest.raises(_Parsed) as parsed:  # the harness's own parser
            main(["bench", *bench])
        ns = parsed.value.args[0]
        unknown = (set(ns.only or ()) | set(ns.skip or ())) - set(_benchmark_names())
        assert not unknown, f"{where}: `ltjax {shlex.join(argv)}` names benchmarks that do not exist: {unknown}"
        return
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"{where}: `ltjax {shlex.join(argv)}` is refused by the parser:\n"
                             f"{capsys.readouterr().err}") from e
    files = _ltjax_files(tmp)
    real = [files.get(a, a) for a in argv]
    rc = main(real)
    out = capsys.readouterr()
    assert rc == 0, f"{where}: `ltjax {shlex.join(argv)}` exits {rc}: {out.err[-2000:]}"
    assert out.out.strip(), f"{where}: `ltjax {shlex.join(argv)}` printed nothing"
    if "--json" in argv:
        json.loads(out.out)
    if argv[0] == "compress":
        assert main(["verify", real[real.index("-o") + 1]]) == 0


def _only(bench: list[str]) -> list[str]:
    if "--only" not in bench:
        return []
    names = []
    for a in bench[bench.index("--only") + 1:]:
        if a.startswith("-"):
            break
        names.append(a)
    return names


def check_make(argv: list[str], where: str) -> None:
    rules = _makefile()
    for target in (a for a in argv if not a.startswith("-") and "=" not in a):
        assert target in rules, f"{where}: `make {target}`: no such target in the Makefile ({sorted(rules)})"
        if shutil_which("make"):
            r = subprocess.run(["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, f"{where}: `make -n {target}` fails: {r.stderr}"


def shutil_which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def check_script(argv: list[str], where: str) -> None:
    direct = argv[0] != "bash"
    path = argv[0] if direct else argv[1]
    if "/" not in path:
        hits = [p for p in ROOT.rglob(path) if ".venv" not in p.parts]
        assert hits, f"{where}: {path}: no such script in the repository"
        return
    assert (ROOT / path).is_file(), f"{where}: {path}: no such file"
    if direct:
        assert os.access(ROOT / path, os.X_OK), f"{where}: {path} is run directly but is not executable"


def check(source: str, command: str, tmp: str, capsys) -> None:
    argv = shlex.split(command)
    while re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        argv = argv[1:]
    head = _head(" ".join(argv))
    for concrete in expand(argv[1:], tmp) if head != "sh" else [argv[1:]]:
        if head == "ltjax":
            check_ltjax(concrete, tmp, source, capsys)
        elif head == "python":
            check_python(concrete, tmp, source)
        elif head == "make":
            check_make(concrete, source)
        else:
            check_script(argv, source)


# ---------------------------------------------------------------------- tests


def test_the_extraction_finds_the_documented_commands():
    cmds = {c for _, c in documented()}
    for want in ("ltjax bench --quick", "make demo", "make test", "python -m models.demo --tiny",
                 "ltjax info '[--json]'", "ltjax verify model.lt", "python -m benchmarks.run",
                 "python -m models.perplexity --windows 2 --window-len 512 '[--json]'"):
        assert want in cmds, sorted(cmds)
    sources = {s.split()[0] for s, _ in documented()}
    assert {"README.md", "benchmarks/README.md", "models/README.md", "Makefile", "benchmarks/gpu_check.sh"} <= sources


def test_expansion_of_placeholders():
    assert expand(["info", "[--json]"], "/t") == [["info"], ["info", "--json"]]
    got = expand(["compress", "m.st", "-o", "m.lt", "[--codec", "auto|raw]", "[--error-budget", "E]"], "/t")
    assert ["compress", "m.st", "-o", "m.lt"] in got
    assert ["compress", "m.st", "-o", "m.lt", "--codec", "auto", "--error-budget", "0.01"] in got
    assert ["compress", "m.st", "-o", "m.lt", "--codec", "raw", "--error-budget", "0.01"] in got
    assert expand(["bench", "[--only", "NAME", "...]"], "/t")[1] == ["bench", "--only", "ffi_matmul"]
    with pytest.raises(AssertionError, match="placeholder 'WHAT'"):
        expand(["x", "WHAT"], "/t")


@pytest.mark.parametrize("source,command", documented(), ids=[f"{s}: {c}" for s, c in documented()])
def test_documented_command(source, command, tmp_path, capsys):
    check(source, command, str(tmp_path), capsys)


@pytest.mark.parametrize("name", _benchmark_names())
def test_every_benchmark_takes_quick_and_out(name, tmp_path):
    """What `ltjax bench` passes each benchmark: ``--out PATH`` and, with --quick, ``--quick``."""
    import importlib

    mod = importlib.import_module(f"benchmarks.{name}")
    for argv in (["--out", str(tmp_path / "x.json"), "--quick"], ["--out", str(tmp_path / "x.json")]):
        buf = io.StringIO()
        with _stop_after_parse(), contextlib.redirect_stderr(buf):
            try:
                mod.main(argv)
            except _Parsed as e:
                ns = e.args[0]
            except SystemExit as e:
                raise AssertionError(f"benchmarks.{name}.main({argv}) refuses it (exit {e.code}): "
                                     f"{buf.getvalue()}") from None
            else:
                raise AssertionError(f"benchmarks.{name}.main ran without parsing its argv")
        assert ns.out == str(tmp_path / "x.json") and getattr(ns, "quick", None) == ("--quick" in argv), vars(ns)


def _help_targets() -> list[tuple[str, list[str]]]:
    """Every command line whose ``--help`` the project shows: ltjax and its subcommands, and each
    documented ``python -m`` module / script of this project."""
    from ltjax.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    out = [("ltjax", []), *[("ltjax", [c]) for c in sub.choices]]
    for _, cmd in documented():
        argv = shlex.split(cmd)
        if argv[0].startswith("python") and argv[1] == "-m" and _own(argv[2]) and argv[2] != "benchmarks.NAME":
            out.append(("module", [argv[2]]))
        elif argv[0].startswith("python") and argv[1].endswith(".py"):
            out.append(("script", [argv[1]]))
    out += [("module", [f"benchmarks.{n}"]) for n in _benchmark_names()]
    return list(dict.fromkeys((k, tuple(v)) for k, v in out))


def test_help_texts_and_the_commands_they_show(tmp_path, capsys):
    """``--help`` of every command exits 0 with a usage line, and each command line it shows
    passes the same checks as the documented ones."""
    from ltjax.cli import main

    seen = 0
    for kind, target in _help_targets():
        if kind == "ltjax":
            with pytest.raises(SystemExit) as e:
                main([*target, "--help"])
            text = capsys.readouterr().out
            code, name = e.value.code, shlex.join(["ltjax", *target, "--help"])
        else:
            status, code, text = run_as_main(target[0], ["--help"], script=kind == "script")
            name = f"python {'-m ' if kind == 'module' else ''}{target[0]} --help"
            assert status == "exit"
        assert code in (0, None) and "usage:" in text, f"`{name}` exits {code}:\n{text[-2000:]}"
        description = re.split(r"^(options|optional arguments|positional arguments):", text, flags=re.M)[0]
        for line in _text_lines(description):
            for cmd in _split_commands(line):
                check(f"`{name}`", shlex.join(cmd), str(tmp_path), capsys)
                seen += 1
    assert seen, "no command line found in any --help text"


def test_the_console_script_is_ltjax_cli_main(tmp_path):
    """`ltjax` as installed: the entry point is `ltjax.cli:main`, and the script runs `ltjax info --json`."""
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="console_scripts") if e.name == "ltjax"]
    assert [e.value for e in eps] == ["ltjax.cli:main"]
    exe = Path(sys.executable).with_name("ltjax")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ltjax.cli"]
    r = subprocess.run([*cmd, "info", "--json"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["ltjax"]


if __name__ == "__main__":  # list what the checks see
    for src, cmd in documented():
        print(f"{src:40s} {cmd}")
