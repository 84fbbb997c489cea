import pytest

from srcr.base.compression import actual_compression, tcr


@pytest.mark.parametrize(
    ("sparsity", "bits", "expected"),
    [
        (0.0, 3, 0.8125),  # 3-bit alone
        (0.25, 4, 0.8125),  # 25% + 4-bit
        (2 / 8, 4, 0.8125),  # 2:8 + 4-bit
        (0.0, 2, 0.875),  # 2-bit alone
        (0.5, 4, 0.875),  # 50% (or 2:4) + 4-bit
        (0.0, 16, 0.0),
    ],
)
def test_tcr_matches_the_paper(sparsity, bits, expected):
    assert tcr(sparsity, bits) == pytest.approx(expected)


@pytest.mark.parametrize(("sparsity", "bits"), [(1.0, 4), (-0.1, 4), (0.2, 0)])
def test_tcr_rejects_impossible_settings(sparsity, bits):
    with pytest.raises(ValueError):
        tcr(sparsity, bits)


def test_actual_compression_from_bytes():
    assert actual_compression(25, 100) == pytest.approx(0.75)
    assert actual_compression(100, 100) == 0.0
