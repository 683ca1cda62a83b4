"""lbgen.method.bias: the ImageNet-9 background gap on a constructed case."""

import numpy as np
import pytest

from lbgen.method.bias import background_gap


def test_background_gap_on_a_constructed_case():
    targets = np.arange(10) % 3
    wrong = (targets + 1) % 3
    same = np.where(np.arange(10) < 9, targets, wrong)  # 9 of 10 right
    rand = np.where(np.arange(10) < 6, targets, wrong)  # 6 of 10 right
    gap = background_gap({"original": (targets, targets), "mixed_same": (same, targets), "mixed_rand": (rand, targets)})
    assert gap == pytest.approx({"original": 100.0, "mixed_same": 90.0, "mixed_rand": 60.0, "bg_gap": 30.0})
    with pytest.raises(ValueError, match="mixed_rand"):
        background_gap({"mixed_same": (same, targets)})
