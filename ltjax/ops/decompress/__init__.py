"""`ltjax.decompress`: public function, VJP and registry in `api`, one module per implementation."""

from ltjax.ops.decompress.api import IMPLEMENTATIONS, decompress, explain
from ltjax.ops.decompress.reference import decompress_reference

__all__ = ["IMPLEMENTATIONS", "decompress", "decompress_reference", "explain"]
