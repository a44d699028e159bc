"""The torch helpers cellseg uses that are not documented API, in one place.

Checked against torch ``TESTED_WITH`` (the pin in pyproject.toml); ``tests/test_torch_private.py``
fails on any other version until each helper below is checked again, and fails where one of them
no longer answers as used here.
"""

from __future__ import annotations

import torch

TESTED_WITH = "2.14.1"  # torch version these helpers were last checked against


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX), where torch's bf16 convolutions
    run about twice as fast as float32 ones; elsewhere bf16 is emulated and slower than float32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
