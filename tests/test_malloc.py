import sys

import numpy as np
import pytest
import torch

from sppdet.malloc import _glibc, large_blocks_reused


def test_large_blocks_reused_takes_effect_on_glibc_and_changes_no_result():
    """Inside the block glibc takes the thresholds (on Linux with glibc), large tensors allocate and free as
    usual, arithmetic is untouched, and the block restores the defaults even when its body raises."""
    x = torch.randn(64, 4096)
    w = torch.randn(4096, 2048)
    ref = x @ w
    with large_blocks_reused() as ok:
        if sys.platform.startswith("linux") and _glibc() is not None:
            assert ok
        for _ in range(3):
            big = x @ w  # 32 MB, over glibc's default mmap threshold
            assert torch.equal(big, ref)
            del big
        a = np.ones(20 << 20, np.uint8)
        assert int(a.sum()) == 20 << 20
    with pytest.raises(RuntimeError, match="body"):
        with large_blocks_reused():
            raise RuntimeError("body")
    assert torch.equal(x @ w, ref)
