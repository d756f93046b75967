"""The codes Python passes the compiled drivers (pyfastpo/backends/native.py) are the
ones the C++ side reads (csrc/native_abi.h): a mismatch would make the kernels read
bfloat16 logits as float16, or write statistics in the wrong rows, without an error."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pyfastpo.backends import native

HEADER = (Path(__file__).resolve().parents[1] / "csrc" / "native_abi.h").read_text()


def test_dtype_codes_match_the_header():
    enum = re.search(r"enum DtypeCode : int \{([^}]*)\}", HEADER).group(1)
    codes = {name.strip(): int(value) for name, value in (item.split("=") for item in enum.split(","))}
    want = {"kFloat32": torch.float32, "kBFloat16": torch.bfloat16, "kFloat16": torch.float16}
    assert codes == {name: native.DTYPE_CODES[dtype] for name, dtype in want.items()}


def test_number_of_statistics_matches_the_header():
    assert native.NUM_STATS == int(re.search(r"constexpr int kNumStats = (\d+);", HEADER).group(1))


def test_no_other_file_defines_them():
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    for path in csrc.iterdir():
        if path.name != "native_abi.h":
            text = path.read_text()
            assert "enum DtypeCode" not in text and "constexpr int kNumStats" not in text, path.name
