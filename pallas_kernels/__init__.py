"""Pallas GPU kernels (Triton lowering) for Helios: flash attention, fused norms, RoPE.

Submodules: `attention` (flash attention + XLA reference), `norm` (LayerNorm, adaLN
LayerNorm, RMSNorm), `rope` (RoPE, fused RMSNorm + RoPE) and `dispatch`, the entry points that
choose an implementation (`impl="xla" | "pallas" | "auto"`, plus "cudnn" for attention).
"""

from pallas_kernels import attention
from pallas_kernels import dispatch
from pallas_kernels import norm
from pallas_kernels import rope
from pallas_kernels._common import PallasUnsupportedError
from pallas_kernels.attention import BlockSizes
from pallas_kernels.dispatch import ImplementationUnavailableError

__all__ = [
    "BlockSizes",
    "ImplementationUnavailableError",
    "PallasUnsupportedError",
    "attention",
    "dispatch",
    "norm",
    "rope",
]
