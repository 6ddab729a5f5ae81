"""Pallas GPU kernels (Triton lowering): fused int8 / int4 / bitmask decode-matmul and decode-to-dense.

The op layer dispatches here through `can_use_pallas` / `matmul` / `matmul_t` / `decompress`.
Kernels, one file each: `int8_matmul`, `int4_matmul` and `bitmask_matmul` (forward and
transposed), `int8_dequant`, `int4_dequant`, `bitmask_unpack`; each exports its ``*_reference``.
`int8_matmul_mosaic`: the int8 forward on Hopper through JAX's Mosaic GPU mixed-type kernel,
taken where a tuned row carries `MosaicTiles`.
"""

from ltjax.pallas._api import (
    DECOMPRESS_CODECS,
    MATMUL_CODECS,
    can_use_pallas,
    decompress,
    kernel_backend,
    matmul,
    matmul_t,
    why_not_pallas,
)
from ltjax.pallas._config import (
    DEFAULT_BLOCK_SIZES,
    INTERPRET_ENV,
    TUNED_BLOCK_SIZES,
    TUNED_ENV,
    BlockSizes,
    MosaicTiles,
    get_block_sizes,
    load_tuned,
    resolve_interpret,
    tuned_table,
)
from ltjax.pallas.bitmask_matmul import bitmask_matmul, bitmask_matmul_reference, bitmask_matmul_t
from ltjax.pallas.bitmask_unpack import bitmask_unpack, bitmask_unpack_reference
from ltjax.pallas.int4_dequant import int4_dequant, int4_dequant_reference
from ltjax.pallas.int4_matmul import int4_matmul, int4_matmul_reference, int4_matmul_t
from ltjax.pallas.int8_dequant import int8_dequant, int8_dequant_reference
from ltjax.pallas.int8_matmul import int8_matmul, int8_matmul_reference, int8_matmul_t

__all__ = [
    "DEFAULT_BLOCK_SIZES",
    "INTERPRET_ENV",
    "DECOMPRESS_CODECS",
    "MATMUL_CODECS",
    "TUNED_BLOCK_SIZES",
    "TUNED_ENV",
    "BlockSizes",
    "MosaicTiles",
    "bitmask_matmul",
    "bitmask_matmul_reference",
    "bitmask_matmul_t",
    "bitmask_unpack",
    "bitmask_unpack_reference",
    "can_use_pallas",
    "decompress",
    "get_block_sizes",
    "int4_dequant",
    "int4_dequant_reference",
    "int4_matmul",
    "int4_matmul_reference",
    "int4_matmul_t",
    "int8_dequant",
    "int8_dequant_reference",
    "int8_matmul",
    "int8_matmul_reference",
    "int8_matmul_t",
    "kernel_backend",
    "load_tuned",
    "matmul",
    "matmul_t",
    "resolve_interpret",
    "tuned_table",
    "why_not_pallas",
]
