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
    safetensors.save_file({"l1.weight": w, "l2.weight": s, "l1.bias": rng.standard_normal(128).astype(np.float32)}, str(p))
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

    from ltjax import ffi as lffi

    assert main(["info", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["backend"] == jax.default_backend() and r["jax"] == jax.__version__
    assert r["cpu_ffi"]["loaded"] == lffi.available()
    routes = r["matmul_routes"]
    assert set(routes) == {f"{c} M={m}" for c in ("int8", "bitmask_int8", "bitmask") for m in (1, 16, 65)}
    if jax.default_backend() == "cpu" and lffi.available() and jax.device_count() == 1:
        assert routes["bitmask_int8 M=1"] == {"impl": "ffi", "why_not_fast_path": None}
        assert routes["bitmask_int8 M=65"]["impl"] == "xla"
        assert "M=65 > 64" in routes["bitmask_int8 M=65"]["why_not_fast_path"]
        assert routes["int8 M=65"]["impl"] == ("ffi" if lffi.info()["amx"] else "xla")  # the AMX GEMM wins at any M
    from ltjax.ffi import gemv

    path, why = gemv.library()
    assert r["cuda_kernels"] == {"library": str(path) if path else None, "reason": why, "auto": gemv.enabled()}
    assert (path is None) == (why is not None)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "ltjax.matmul with f32 activations runs:" in out and "bitmask_int8 M=1" in out
    assert "CUDA small-M kernels (docs/cuda.md): " + (f"built, {path}" if path else why) in out
    if lffi.available():
        assert ("AMX tiles" if lffi.info()["amx"] else "f32 kernel") in out


def test_info_names_the_gpu_kernel_of_a_pallas_route(capsys, monkeypatch):
    """Where `ltjax.matmul` takes the Pallas path, `ltjax info` says which kernel: Triton, or the
    int8 Mosaic GPU one (Hopper only, so Triton here: the route is forced, the kernel choice real)."""
    import jax

    import ltjax

    monkeypatch.setattr(ltjax, "matmul_impl", lambda x, ct: "pallas")
    assert main(["info", "--json"]) == 0
    routes = json.loads(capsys.readouterr().out)["matmul_routes"]
    want = "triton" if jax.default_backend() != "gpu" else None
    for name, route in routes.items():
        assert route["impl"] == "pallas" and route["kernel"] in ("triton", "mosaic"), (name, route)
        if want:
            assert route["kernel"] == want
    assert main(["info"]) == 0
    assert "pallas (triton)" in capsys.readouterr().out or jax.default_backend() == "gpu"
