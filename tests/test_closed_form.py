"""The UCE closed form (through the closed-form op) against a direct least-squares solve."""
import pytest
import torch

from fasterase.training.closed_form import uce_weights


@pytest.mark.parametrize("n,m,d_in,d_out", [(1, 0, 7, 5), (12, 30, 16, 9), (40, 3, 33, 64)])
@pytest.mark.parametrize("lam", [1e-3, 0.5, 3.0])
def test_matches_least_squares(n, m, d_in, d_out, lam):
    g = torch.Generator().manual_seed(n * 100 + m + int(lam * 10))
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    c = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    guide = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    p = torch.randn(m, d_in, generator=g, dtype=torch.float64)
    es, ps = 1.5, 0.7
    w32 = w.float()
    (w_new,) = uce_weights([w32], c.float(), guide.float(), p.float(), lam, es, ps)
    assert torch.equal(w32, w.float())  # the input weight is left as it was
    # min es|W'C^T - W G^T|^2 + ps|W'P^T - W P^T|^2 + lam|W' - W|^2 as one stacked least squares
    eye = torch.eye(d_in, dtype=torch.float64)
    a = torch.cat([es ** 0.5 * c, ps ** 0.5 * p, lam ** 0.5 * eye])
    b = torch.cat([es ** 0.5 * guide @ w.T, ps ** 0.5 * p @ w.T, lam ** 0.5 * w.T])
    expected = torch.linalg.lstsq(a, b).solution.T
    # fp32 inputs and output: tolerance relative to the problem's conditioning
    cond = torch.linalg.cond(a).item()
    assert torch.allclose(w_new.double(), expected, rtol=0, atol=1e-5 * cond * expected.abs().max())


def test_identity_when_guide_equals_concept():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(5, 8, generator=g)
    w = torch.randn(4, 8, generator=g)
    (w_new,) = uce_weights([w], c, c, torch.randn(3, 8, generator=g), 0.5)
    assert torch.allclose(w_new, w, atol=1e-5)


def test_errors():
    w = [torch.randn(3, 4)]
    with pytest.raises(ValueError, match="erase and guide"):
        uce_weights(w, torch.randn(2, 4), torch.randn(3, 4), torch.randn(0, 4), 0.5)
    with pytest.raises(ValueError, match="preserve"):
        uce_weights(w, torch.randn(2, 4), torch.randn(2, 4), torch.randn(1, 5), 0.5)
    with pytest.raises(ValueError, match="lam"):
        uce_weights(w, torch.randn(2, 4), torch.randn(2, 4), torch.randn(0, 4), 0.0)
