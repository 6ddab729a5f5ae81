"""ltjax: compressed tensors that JAX programs compute on directly.

>>> import numpy as np, ltjax
>>> w = np.random.default_rng(0).standard_normal((256, 128)).astype(np.float32)
>>> ct = ltjax.compress(w, "int8")
>>> ct.codec, ct.shape, round(ct.ratio, 2)
('int8', (256, 128), 3.9)
"""

from ltjax import monitor, nn, nnx  # noqa: E402  (submodules, after the names they use)
from ltjax._activations import (
    compressed_residual,
    dense_residuals,
    overflow_events,
    reset_overflow_events,
    sparse_dense,
    suggest_capacity,
    value_and_grad_exact,
)
from ltjax._analyze import (
    AnalysisReport,
    CompressionReport,
    Policy,
    TensorStats,
    analyze,
    compress,
    compress_tree,
    tree_report,
)
from ltjax._calibrate import InputStats
from ltjax._errors import ChecksumError, LTFormatError
from ltjax._format import CODECS, FORMAT_VERSION, CompressedTensor, Header, index_rows
from ltjax._io import load, save, verify
from ltjax._plan import Plan, plan
from ltjax._sharding import shard
from ltjax.ops.decompress import decompress, decompress_reference
from ltjax.ops.matmul import explain, matmul, matmul_impl, matmul_reference

__version__ = "0.1.0"

__all__ = [
    "CODECS",
    "FORMAT_VERSION",
    "AnalysisReport",
    "ChecksumError",
    "CompressedTensor",
    "CompressionReport",
    "Header",
    "InputStats",
    "LTFormatError",
    "Plan",
    "Policy",
    "TensorStats",
    "analyze",
    "compress",
    "compress_tree",
    "compressed_residual",
    "dense_residuals",
    "overflow_events",
    "reset_overflow_events",
    "sparse_dense",
    "suggest_capacity",
    "value_and_grad_exact",
    "decompress",
    "decompress_reference",
    "explain",
    "index_rows",
    "load",
    "matmul",
    "matmul_impl",
    "matmul_reference",
    "monitor",
    "nn",
    "nnx",
    "plan",
    "save",
    "shard",
    "tree_report",
    "verify",
]
