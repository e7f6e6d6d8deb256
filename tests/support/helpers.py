"""Small models, data and fixtures shared by the API and bad-input tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: intra-op threads only add overhead (and are very slow on a loaded 2-core machine).
    Import it into a test module to apply it there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def float64_default():
    """Float64 as the default dtype for the test (reference computations); import it with autouse in a module
    via ``pytestmark = pytest.mark.usefixtures("float64_default")``."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def mlp(dtype=torch.float32, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def batch(i: int, dtype=torch.float32, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def loss(model: nn.Module, i: int, dtype=torch.float32, n: int = 8) -> torch.Tensor:
    """Cross-entropy of ``model`` on :func:`batch` ``i``."""
    x, y = batch(i, dtype, n)
    return nn.functional.cross_entropy(model(x), y)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0, dtype=torch.float32) -> None:
    """``steps`` optimizer steps on batches ``start, start + 1, ...``."""
    for i in range(start, start + steps):
        opt.zero_grad()
        loss(model, i, dtype).backward()
        opt.step()


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def grad_matrix(layer: nn.Linear) -> torch.Tensor:
    """The layer's gradient as K-FAC's ``(g_dim, a_dim)`` matrix (bias as last column), a copy."""
    return torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1).clone()


def dense_ggn(model: nn.Module, x: torch.Tensor, loss) -> tuple[torch.Tensor, list[str]]:
    """The dense generalised Gauss-Newton ``J^T H J`` of ``loss(outputs)`` at ``model``'s parameters (``torch.func``:
    the Jacobian of the flattened outputs and the Hessian of the loss in them), with the parameter names in the
    order of the flattening."""
    from torch.func import functional_call, hessian, jacrev

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def outputs(flat: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(names, (t.reshape(s) for t, s in zip(flat.split(sizes), shapes)))),
                               (x,))

    z = outputs(theta)
    jac = jacrev(lambda t: outputs(t).reshape(-1))(theta)
    h = hessian(lambda zz: loss(zz.reshape(z.shape)))(z.reshape(-1).detach())
    return jac.T @ h @ jac, names


class LlamaStyleRMSNorm(nn.Module):
    """Written as Hugging Face writes its RMSNorm classes (computed in float32, scale applied after)."""

    def __init__(self, d: int, gemma: bool = False) -> None:
        super().__init__()
        self.gemma = gemma
        self.weight = nn.Parameter(torch.zeros(d) if gemma else torch.ones(d))
        self.variance_epsilon = 1e-6

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        normed = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return normed * (1.0 + self.weight) if self.gemma else self.weight * normed


class HandLayerNorm(nn.Module):
    """A LayerNorm-style module with a scale and a shift, from another library."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

    def forward(self, x):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
        return (x - mu) / torch.sqrt(var + 1e-5) * self.weight + self.bias
