import numpy as np
import torch

from srcr.base.logits import log_softmax


def test_float32_log_softmax_matches_float64_and_leaves_its_input_alone():
    logits = np.random.default_rng(0).normal(0, 8, size=(64, 49152)).astype(np.float32)
    before = logits.copy()
    result = log_softmax(logits)
    reference = torch.log_softmax(torch.from_numpy(logits).double(), -1).numpy()
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, reference, atol=2e-5)
    np.testing.assert_array_equal(logits, before)
    np.testing.assert_allclose(np.exp(result.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
