"""The torch helpers of cellseg.torch_private exist and answer as cellseg uses them.

A torch upgrade fails here first: re-check each helper, then update TESTED_WITH.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cellseg import torch_private

CPUINFO = Path("/proc/cpuinfo")


def test_pinned_version() -> None:
    installed = torch.__version__.split("+")[0]
    assert installed == torch_private.TESTED_WITH, (
        f"torch {installed} is installed but cellseg/torch_private.py was checked against "
        f"{torch_private.TESTED_WITH}: re-check its helpers, then update TESTED_WITH"
    )


@pytest.mark.skipif(not CPUINFO.is_file(), reason="needs Linux's /proc/cpuinfo")
def test_cpu_bf16_answer_agrees_with_the_cpu_flags() -> None:
    flags = {
        flag
        for line in CPUINFO.read_text().splitlines()
        if line.startswith("flags")
        for flag in line.split(":", 1)[1].split()
    }
    assert torch_private.cpu_computes_bf16() is bool(flags & {"avx512_bf16", "amx_bf16"})
