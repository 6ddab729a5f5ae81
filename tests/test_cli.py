"""The `ltjax` command line on real files it makes."""

import json

import numpy as np
import pytest

import ltjax
from ltjax.cli import main


@pytest.fixture
def model_file(tmp_path):
    safetensors = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 128)).astype(np.float32)
    s = w.copy()
    s[rng.random(s.shape) < 0.8] = 0
    p = tmp_path / "m.safetensors"
    bias = rng.standard_normal(128).astype(np.float32)
    safetensors.save_file({"l1.weight": w, "l2.weight": s, "l1.bias": bias}, str(p))
    return p


def test_analyze_compress_inspect_verify(model_file, tmp_path, capsys):
    assert main(["analyze", str(model_file)]) == 0
    out = capsys.readouterr().out
    assert "l2.weight" in out and "bitmask" in out
    assert main(["analyze", str(model_file), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tensors"]) == 3

    lt = tmp_path / "m.lt"
    assert main(["compress", str(model_file), "-o", str(lt), "--error-budget", "0.01", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    codecs = {l["path"]: l["codec"] for l in rep["leaves"]}
    assert codecs == {"l1.weight": "int8", "l2.weight": "bitmask_int8", "l1.bias": "dense"}

    assert main(["inspect", str(lt)]) == 0
    assert "bitmask_int8" in capsys.readouterr().out
    assert main(["inspect", str(lt), "--json"]) == 0
    assert {t["path"] for t in json.loads(capsys.readouterr().out)["tensors"]} == set(codecs)
    assert main(["verify", str(lt)]) == 0
    assert capsys.readouterr().out.startswith("OK ")

    back = ltjax.load(lt)
    np.testing.assert_allclose(np.asarray(ltjax.decompress(back["l2.weight"])), np.asarray(
        ltjax.decompress(ltjax.compress(np.asarray(ltjax.decompress(back["l2.weight"])), "raw"))))
    assert main(["analyze", str(lt)]) == 0  # an ltjax file is analyzed through its decoded tensors


def test_npz_input(tmp_path, capsys):
    p = tmp_path / "a.npz"
    np.savez(p, w=np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32))
    assert main(["compress", str(p), "-o", str(tmp_path / "a.lt"), "--codec", "int8", "--min-size", "1"]) == 0
    assert ltjax.load(tmp_path / "a.lt")["w"].codec == "int8"


def test_errors_are_reported_not_raised(tmp_path, capsys):
    bad = tmp_path / "bad.lt"
    bad.write_bytes(b"garbage" * 10)
    assert main(["verify", str(bad)]) == 1
    assert "not an ltjax file" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.lt")]) == 1
    assert "no such file" in capsys.readouterr().err.lower()


def test_info_says_what_runs_here(capsys):
    import jax

    from ltjax.ffi import cpu as lffi

    assert main(["info", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["backend"] == jax.default_backend() and r["jax"] == jax.__version__
    assert r["cpu_ffi"]["loaded"] == lffi.available()
    routes = r["matmul_routes"]
    assert set(routes) == {f"{c} M={m}" for c in ("int8", "bitmask_int8", "bitmask", "int4") for m in (1, 16, 65, 257)}
    if jax.default_backend() == "cpu" and lffi.available() and jax.device_count() == 1:
        assert routes["bitmask_int8 M=1"]["impl"] == "ffi" and routes["bitmask_int8 M=1"]["why_not"] == {}
        assert routes["int4 M=16"]["impl"] == "ffi" and routes["int4 M=16"]["backward"] == "dx: ffi"
        assert routes["bitmask_int8 M=65"]["impl"] == "xla" and routes["int4 M=65"]["impl"] == "ffi"
        assert "M=65 > 64" in routes["bitmask_int8 M=65"]["why_not"]["ffi"]
        assert routes["int4 M=257"]["impl"] == "xla" and "M=257 > 256" in routes["int4 M=257"]["why_not"]["ffi"]
    for route in routes.values():  # what a program lowered for another platform holds
        assert route["platforms"]["cuda"] == "pallas" and route["backward"].startswith("dx: ")
        assert routes["int8 M=65"]["impl"] == ("ffi" if lffi.info()["amx"] else "xla")  # the AMX GEMM wins at any M
    from ltjax.ffi import cuda

    path, why = cuda.library()
    assert r["cuda_kernels"] == {"library": str(path) if path else None, "reason": why, "auto": cuda.enabled()}
    assert (path is None) == (why is not None)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "ltjax.matmul with f32 activations runs (ltjax.explain" in out and "bitmask_int8 M=1" in out
    assert "CUDA small-M kernels (docs/cuda.md): " + (f"built, {path}" if path else why) in out
    if lffi.available():
        assert ("AMX tiles" if lffi.info()["amx"] else "f32 kernel") in out


def test_info_names_the_gpu_kernel_of_a_pallas_route(capsys):
    """`ltjax info` says which GPU kernel a program lowered for CUDA holds: Triton, or the int8 Mosaic
    GPU one (chosen when tracing on a Hopper GPU: so Triton from this host unless it is one)."""
    import jax

    assert main(["info", "--json"]) == 0
    routes = json.loads(capsys.readouterr().out)["matmul_routes"]
    for name, route in routes.items():
        assert route["cuda_kernel"] in ("triton", "mosaic"), (name, route)
        if jax.default_backend() != "gpu":
            assert route["cuda_kernel"] == "triton"
    assert main(["info"]) == 0
    assert "lowered for CUDA: pallas (triton)" in capsys.readouterr().out or jax.default_backend() == "gpu"


def test_info_shows_which_ltjax_was_imported_and_whether_its_extension_loaded(capsys):
    import os

    from ltjax.ffi import cpu as lffi

    assert main(["info", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    pkg = os.path.dirname(os.path.abspath(ltjax.__file__))
    assert r["package"]["path"] == pkg and isinstance(r["package"]["shadows_installed"], bool)
    f = r["cpu_ffi"]
    assert f["loaded"] == lffi.available()
    if f["loaded"]:
        assert os.path.isfile(f["path"]) and f["reason"] is None
    else:
        assert f["path"] is None and f["reason"]
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"ltjax imported from {pkg}" in out
    assert (f"CPU FFI extension: loaded from {f['path']}" if f["loaded"] else
            f"CPU FFI extension: not loaded ({f['reason']})") in out


def _source_tree_without_extension(tmp_path):
    """A checkout's copy of the ltjax package (sources only, no built extension) and, beside it, an
    installed ltjax that has one, as a non-editable `pip install .` leaves them."""
    import importlib.machinery
    import shutil
    from pathlib import Path

    src = tmp_path / "checkout"
    shutil.copytree(Path(ltjax.__file__).parent, src / "ltjax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "_build_info.txt", "_cuda_build_info.txt"))
    (src / "pyproject.toml").write_text("[project]\nname = 'ltjax'\n")
    site = tmp_path / "site-packages"
    (site / "ltjax" / "ffi" / "cpu").mkdir(parents=True)
    (site / "ltjax" / "__init__.py").write_text("")
    built = site / "ltjax" / "ffi" / "cpu" / f"_ltjax_ffi{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    built.write_bytes(b"")  # only its presence is read
    return src, site


def test_a_source_tree_without_the_extension_says_why_and_how_to_fix(tmp_path):
    """`python -m ...` from a checkout whose venv has a non-editable install imports the source tree,
    which has no built extension: the one log line says so, names the shadowed install, and says how
    to fix it; `ltjax info --json` shows the imported package and the same reason."""
    import os
    import subprocess
    import sys
    import textwrap

    src, site = _source_tree_without_extension(tmp_path)
    code = textwrap.dedent(
        """
        import json, logging, sys
        # This venv's ltjax is an editable install, whose import hook would find the real checkout:
        # without it, the interpreter sees what a non-editable install gives (sys.path order only).
        sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("_editable")]
        logging.basicConfig(level=logging.INFO, format="LOG %(message)s", stream=sys.stdout)
        import numpy as np, jax.numpy as jnp
        import ltjax, ltjax.ffi.cpu as F
        from ltjax.cli import main
        ltjax.matmul(jnp.ones((1, 64)), ltjax.compress(np.ones((64, 32), np.float32), "int8"))
        print("REASON", F.unavailable_reason())
        print("INFO", end=" ")
        main(["info", "--json"])
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(site)])}
    env.pop("LTJAX_DISABLE_FFI", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       cwd=src)
    assert r.returncode == 0, r.stderr[-3000:]
    reason = r.stdout.split("REASON ", 1)[1].splitlines()[0]
    logs = [ln for ln in r.stdout.split("REASON ", 1)[0].splitlines() if ln.startswith("LOG ") and reason in ln]
    assert len(logs) == 1, r.stdout  # the matmul's fallback, logged once with the reason
    log = logs[0]
    assert f"imported from {src / 'ltjax'}" in log and "source tree without the built" in log
    assert f"shadows the installed ltjax at {site / 'ltjax'}" in log
    assert "`pip install -e .`" in log and str(src) in log and "run from outside the checkout" in log
    lines = r.stdout.split("INFO ", 1)[1].splitlines()  # the report, after any log lines `info` gave
    info = json.loads("\n".join(lines[next(i for i, ln in enumerate(lines) if ln.startswith("{")):]))
    assert info["package"]["path"] == str(src / "ltjax")
    assert info["cpu_ffi"]["loaded"] is False and info["cpu_ffi"]["path"] is None
    assert info["cpu_ffi"]["reason"] == reason
    assert all(route["impl"] != "ffi" for route in info["matmul_routes"].values())


def test_missing_extension_reasons(tmp_path):
    """Without another install: build it in the checkout; a built file that fails to load: rebuild."""
    from ltjax.ffi.cpu._registry import diagnose_missing

    src, site = _source_tree_without_extension(tmp_path)
    err = ModuleNotFoundError("No module named 'ltjax.ffi.cpu._ltjax_ffi'")
    why = diagnose_missing(err, package=src / "ltjax", search=[str(src)], build_info=tmp_path / "none.txt")
    assert "not built for the ltjax imported from" in why and f"`pip install -e .` in {src}" in why
    assert "C++ compiler and CMake" in why and "shadows" not in why
    info = tmp_path / "_build_info.txt"
    info.write_text("no C++ compiler found")
    why = diagnose_missing(err, package=src / "ltjax", search=[str(src), str(site)], build_info=info)
    assert "(no C++ compiler found)" in why and f"shadows the installed ltjax at {site / 'ltjax'}" in why
    why = diagnose_missing(ImportError("undefined symbol: X"), package=site / "ltjax", search=[str(site)])
    assert "failed to load (ImportError: undefined symbol: X)" in why and "rebuild" in why
