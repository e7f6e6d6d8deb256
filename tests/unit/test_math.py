"""K-FAC math against dense float64 references (torch.func Fisher blocks, dense solves, explicit Kroneckers).

Conventions: a weight-gradient matrix V is (d_out, d_in[+1 for bias]); vec is column-major, so
kron(A, G) @ vec(V) == vec(G V A) and torch.kron(A, G) is the matrix of A (x) G.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import kfac
from helpers import float64_default  # noqa: F401
from kfac.modules import ConvAdapter



pytestmark = pytest.mark.usefixtures("float64_default")


EXACT = dict(factor_decay=0.0, kl_clip=None, factor_dtype=torch.float64)


def vec(m: torch.Tensor) -> torch.Tensor:
    return m.T.reshape(-1)


def unvec(v: torch.Tensor, rows: int) -> torch.Tensor:
    return v.reshape(-1, rows).T


def layer_grad_matrix(grads: dict, name: str, bias: bool) -> torch.Tensor:
    w = grads[f"{name}.weight"].reshape(grads[f"{name}.weight"].shape[0], -1)
    return torch.cat([w, grads[f"{name}.bias"][:, None]], 1) if bias else w


def grad_matrix_of(module: nn.Module) -> torch.Tensor:
    w = module.weight.grad.reshape(module.weight.shape[0], -1)
    return torch.cat([w, module.bias.grad[:, None]], 1) if module.bias is not None else w


def deep_net(bias: bool, act: bool) -> nn.Sequential:
    layers = []
    for d_in, d_out in [(5, 7), (7, 4), (4, 3)]:
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if act:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers[:-1] if act else layers)


@pytest.mark.parametrize("bias,act", [(False, False), (True, True)])
@pytest.mark.parametrize("damping", [1e-3, 0.3])
def test_single_example_kfac_block_is_exact_empirical_fisher(bias, act, damping):
    """One data point: every layer's A (x) G equals the dense empirical Fisher block (torch.func) and the eigen
    method's preconditioned gradient equals the dense solve (F_block + damping I)^-1 g."""
    model = deep_net(bias, act)
    x, t = torch.randn(1, 5), torch.randn(1, 3)
    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = grad(lambda p: F.mse_loss(functional_call(model, p, (x,)), t))(params)

    pre = kfac.KFACPreconditioner(model, damping=damping, method="eigen", **EXACT)
    F.mse_loss(model(x), t).backward()
    pre.step()
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert pre.layers == linear_names
    for name in linear_names:
        g = vec(layer_grad_matrix(grads, name, bias))
        fisher_block = torch.outer(g, g)
        entry = pre.store[name]
        torch.testing.assert_close(torch.kron(entry.A, entry.G), fisher_block, rtol=1e-10, atol=1e-14)
        expected = torch.linalg.solve(fisher_block + damping * torch.eye(g.numel()), g)
        actual = vec(grad_matrix_of(dict(model.named_modules())[name]))
        torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("damping", [1e-3, 0.3])
def test_single_example_inverse_method_is_dense_damped_kronecker_inverse(damping):
    model = deep_net(bias=False, act=False)
    x, t = torch.randn(1, 5), torch.randn(1, 3)
    pre = kfac.KFACPreconditioner(model, damping=damping, method="inverse", **EXACT)
    F.mse_loss(model(x), t).backward()
    raw = {n: grad_matrix_of(m).clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    pre.step()
    for name, g in raw.items():
        entry = pre.store[name]
        eye_a, eye_g = torch.eye(entry.a_dim), torch.eye(entry.g_dim)
        dense = torch.kron(torch.linalg.inv(entry.A + damping * eye_a), torch.linalg.inv(entry.G + damping * eye_g))
        actual = vec(grad_matrix_of(dict(model.named_modules())[name]))
        torch.testing.assert_close(actual, dense @ vec(g), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_batch_preconditioning_equals_dense_kronecker_solve(method):
    """Any batch, any factors: eigen == (A(x)G + d I)^-1, inverse == (A+dI)^-1 (x) (G+dI)^-1, incl. the kl-clip
    scale nu = min(1, sqrt(kl_clip / |sum lr^2 <P(g), g>|))."""
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    damping, lr, kl_clip = 0.05, 0.3, 1e-4
    pre = kfac.KFACPreconditioner(model, damping=damping, method=method, factor_decay=0.7, kl_clip=kl_clip, lr=lr,
                                  factor_dtype=torch.float64)
    F.cross_entropy(model(x), y).backward()
    raw = {n: grad_matrix_of(m).clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    pre.step()
    expected, vg = {}, 0.0
    for name, g in raw.items():
        entry = pre.store[name]
        ia, ig = torch.eye(entry.a_dim), torch.eye(entry.g_dim)
        if method == "eigen":
            p = torch.linalg.solve(torch.kron(entry.A, entry.G) + damping * torch.eye(ia.shape[0] * ig.shape[0]), vec(g))
        else:
            p = torch.kron(torch.linalg.inv(entry.A + damping * ia), torch.linalg.inv(entry.G + damping * ig)) @ vec(g)
        expected[name] = p
        vg += lr**2 * float(p @ vec(g))
    nu = min(1.0, (kl_clip / abs(vg)) ** 0.5)
    assert nu < 1.0  # the clip is active in this configuration
    for name, p in expected.items():
        actual = vec(grad_matrix_of(dict(model.named_modules())[name]))
        torch.testing.assert_close(actual, nu * p, rtol=1e-8, atol=1e-12)


def test_running_average_starts_from_identity():
    """A <- a A + (1-a) A_batch with A initialised to I: after two updates A = a^2 I + a(1-a) A1 + (1-a) A2."""
    model = nn.Linear(3, 2)
    a = 0.6
    pre = kfac.KFACPreconditioner(model, factor_decay=a, kl_clip=None, factor_dtype=torch.float64)
    batches = [torch.randn(8, 3) for _ in range(2)]
    a_batches, g_batches = [], []
    for xb in batches:
        out = model(xb)
        out.retain_grad()
        out.pow(2).sum().backward()
        rows = torch.cat([xb, torch.ones(8, 1)], 1)
        a_batches.append(rows.T @ rows / 8)
        g_batches.append(out.grad.T @ out.grad / 8)
        pre.step()
        model.zero_grad()
    eye3, eye2 = torch.eye(4), torch.eye(2)
    torch.testing.assert_close(pre.store[""].A, a * a * eye3 + a * (1 - a) * a_batches[0] + (1 - a) * a_batches[1])
    torch.testing.assert_close(pre.store[""].G, a * a * eye2 + a * (1 - a) * g_batches[0] + (1 - a) * g_batches[1])
    assert pre.store[""].num_updates == 2


def _captured_output_grads(model: nn.Module, loss_fn, x) -> dict[str, torch.Tensor]:
    """Gradients w.r.t. each module's output, captured independently of kfac's hooks."""
    outs = {}

    def keep(name):
        def hook(_m, _i, out):
            out.retain_grad()
            outs[name] = out
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    loss_fn(model(x)).backward()
    for h in handles:
        h.remove()
    return {n: o.grad for n, o in outs.items()}


@pytest.mark.parametrize("conv_kwargs", [
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=(3, 2), stride=2, padding=(2, 1), dilation=(1, 2)),
    dict(kernel_size=3, padding="same", padding_mode="reflect", bias=False),
    dict(kernel_size=2, padding="valid", stride=(1, 2)),
    dict(kernel_size=3, padding=1, padding_mode="circular"),
])
def test_conv2d_factors_equal_unfold_reference(conv_kwargs):
    conv = nn.Conv2d(3, 4, **conv_kwargs)
    model = nn.Sequential(conv)
    x = torch.randn(5, 3, 7, 6)
    pre = kfac.KFACPreconditioner(model, **EXACT)
    loss_fn = lambda out: out.pow(2).mean() + out.sum()  # noqa: E731
    g = _captured_output_grads(model, loss_fn, x)["0"]
    raw = grad_matrix_of(conv).clone()
    pre.step()

    # reference: explicit padding then F.unfold; rows scaled by 1/S, both factors normalised by N*S
    xp = x
    m = conv
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        if m.padding == "same":
            pads = []
            for k, d in zip(reversed(m.kernel_size), reversed(m.dilation)):
                tot = d * (k - 1)
                pads += [tot // 2, tot - tot // 2]
        elif m.padding == "valid":
            pads = [0, 0, 0, 0]
        else:
            pads = [m.padding[1], m.padding[1], m.padding[0], m.padding[0]]
        xp = F.pad(x, pads, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
        padding = 0
    else:
        padding = m.padding
    patches = F.unfold(xp, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)  # (N, Ckk, S)
    n, s = x.shape[0], patches.shape[-1]
    assert s == g.shape[2] * g.shape[3]
    rows = patches.transpose(1, 2).reshape(n * s, -1)
    if m.bias is not None:
        rows = torch.cat([rows, torch.ones(n * s, 1)], 1)
    grows = g.permute(0, 2, 3, 1).reshape(n * s, -1)
    # im2col rows reproduce the weight gradient (the layout K-FAC preconditions)
    torch.testing.assert_close(grows.T @ rows, raw)
    A_ref = (rows / s).T @ (rows / s) / (n * s)
    G_ref = (grows / s).T @ (grows / s) / (n * s)
    torch.testing.assert_close(pre.store["0"].A, A_ref)
    torch.testing.assert_close(pre.store["0"].G, G_ref)


def test_conv2d_unbatched_input_equals_a_batch_of_one():
    conv = nn.Conv2d(2, 3, 3)
    adapter = ConvAdapter(conv)
    x = torch.randn(2, 5, 5)
    torch.testing.assert_close(adapter.a_rows(x), adapter.a_rows(x[None]))


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_linear_sequence_inputs_equal_flattened_rows(method):
    """A Linear on (B, T, D) inputs gives the factors and update of the same Linear on (B*T, D) rows."""
    torch.manual_seed(1)
    m3 = nn.Linear(6, 4)
    m2 = nn.Linear(6, 4)
    m2.load_state_dict(m3.state_dict())
    x, t = torch.randn(3, 5, 6), torch.randn(3, 5, 4)
    results = []
    for model, xi, ti in [(m3, x, t), (m2, x.reshape(15, 6), t.reshape(15, 4))]:
        pre = kfac.KFACPreconditioner(model, method=method, factor_decay=0.5, kl_clip=None, factor_dtype=torch.float64)
        F.mse_loss(model(xi), ti).backward()
        pre.step()
        results.append((pre.store[""].A, pre.store[""].G, grad_matrix_of(model)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_embedding_equals_one_hot_linear(method):
    vocab, dim = 7, 3
    emb = nn.Embedding(vocab, dim)
    lin = nn.Linear(vocab, dim, bias=False)
    with torch.no_grad():
        lin.weight.copy_(emb.weight.T)
    idx = torch.tensor([[1, 3, 3, 0], [6, 1, 1, 1]])
    target = torch.randn(2, 4, dim)
    out = {}
    for name, model, inp in [("emb", emb, idx), ("lin", lin, F.one_hot(idx, vocab).to(torch.float64))]:
        pre = kfac.KFACPreconditioner(model, method=method, factor_decay=0.5, damping=0.1, kl_clip=None,
                                      factor_dtype=torch.float64)
        for _ in range(2):  # two steps: exercises the identity initialisation and the running average
            model.zero_grad()
            F.mse_loss(model(inp), target).backward()
            pre.step()
        out[name] = (pre.store[""], model.weight.grad.clone())
    e_entry, e_grad = out["emb"]
    l_entry, l_grad = out["lin"]
    assert e_entry.a_diagonal and e_entry.A.shape == (vocab,)
    torch.testing.assert_close(torch.diag(e_entry.A), l_entry.A)
    torch.testing.assert_close(e_entry.G, l_entry.G)
    torch.testing.assert_close(e_grad.T, l_grad, rtol=1e-10, atol=1e-12)


def _small_convnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 5))


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_gradient_accumulation_equals_concatenated_batch(method):
    """k micro-batches (loss / k, accumulation_steps=k) == one step on the concatenated batch, over several steps."""
    torch.manual_seed(0)
    ref, acc = _small_convnet(), _small_convnet()
    acc.load_state_dict(ref.state_dict())
    kw = dict(factor_update_steps=1, inv_update_steps=2, damping=0.01, factor_decay=0.8, kl_clip=1e-2,
              method=method, factor_dtype=torch.float64)
    opt_ref = kfac.KFAC(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), **kw)
    opt_acc = kfac.KFAC(acc, torch.optim.SGD(acc.parameters(), lr=0.1, momentum=0.9), accumulation_steps=3, **kw)
    for _ in range(3):
        x, y = torch.randn(12, 2, 7, 7), torch.randint(0, 5, (12,))
        opt_ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt_ref.step()
        opt_acc.zero_grad()
        for xb, yb in zip(x.chunk(3), y.chunk(3)):
            (F.cross_entropy(acc(xb), yb) / 3).backward()
        opt_acc.step()
    for name in opt_ref.store:
        torch.testing.assert_close(opt_acc.store[name].A, opt_ref.store[name].A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(opt_acc.store[name].G, opt_ref.store[name].G, rtol=1e-10, atol=1e-12)
    for p_ref, p_acc in zip(ref.parameters(), acc.parameters()):
        torch.testing.assert_close(p_acc, p_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bernoulli"])
def test_mc_fisher_G_is_unbiased_for_the_output_hessian(loss, chunks):
    """E[G_mc] = (1/B) sum_n H_n / B^2, H_n the per-example output Hessian (the GGN's middle term); the same
    when the batch is split into accumulated micro-batches."""
    torch.manual_seed(0)
    b, d = 4, 3
    model = nn.Linear(5, d)
    x = torch.randn(b, 5)
    pre = kfac.KFACPreconditioner(model, fisher="mc", factor_decay=0.0, kl_clip=None, factor_dtype=torch.float64,
                                  accumulation_steps=chunks)
    gen = torch.Generator().manual_seed(0)
    samples = 4000
    outs = []
    for xb in x.chunk(chunks):
        out = model(xb)
        outs.append(out)
        for _ in range(samples):
            pre.mc_backward(out, loss=loss, generator=gen)
        user_loss = F.cross_entropy(out, torch.zeros(len(xb), dtype=torch.long)) if loss == "cross_entropy" \
            else out.pow(2).mean() if loss == "mse" else F.binary_cross_entropy_with_logits(out, torch.rand(out.shape))
        (user_loss / chunks).backward()
    pre.step()
    out = torch.cat(outs)
    if loss == "cross_entropy":
        p = torch.softmax(out.detach(), -1)
        hessians = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    elif loss == "mse":  # F.mse_loss(mean): per-example loss (1/D)||out - y||^2 has Hessian (2/D) I
        hessians = (2.0 / d) * torch.eye(d).expand(b, d, d)
    else:  # element-mean BCE with logits: per-example loss (1/D) sum BCE has Hessian diag(s (1 - s)) / D
        s = torch.sigmoid(out.detach())
        hessians = torch.diag_embed(s * (1 - s)) / d
    expected = hessians.sum(0) / b / b**2
    rel = torch.linalg.matrix_norm(pre.store[""].G - expected) / torch.linalg.matrix_norm(expected)
    assert rel < 0.05, rel


def test_mc_fisher_G_matches_sampled_labels_exactly():
    """With a fixed generator, G equals g^T g / N of the gradients of the loss on the very labels sampled."""
    model = nn.Linear(5, 4)
    x = torch.randn(6, 5)
    pre = kfac.KFACPreconditioner(model, fisher="mc", factor_decay=0.0, kl_clip=None, factor_dtype=torch.float64)
    out = model(x)
    pre.mc_backward(out, generator=torch.Generator().manual_seed(3))
    F.cross_entropy(out, torch.zeros(6, dtype=torch.long)).backward()
    pre.step()
    logits = out.detach()
    labels = torch.multinomial(torch.softmax(logits, -1), 1, generator=torch.Generator().manual_seed(3)).reshape(-1)
    g = (torch.softmax(logits, -1) - F.one_hot(labels, 4)) / 6
    torch.testing.assert_close(pre.store[""].G, g.T @ g / 6)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("case", ["padding_taps", "dead_inputs"])
def test_block_structured_factors_equal_dense_kronecker_solve(method, case):
    """Coordinates that only ever see zeros (padding-only kernel taps at 1x1 spatial size, dead inputs) make A
    exactly block-diagonal; the block-wise decomposition must give the dense answer, also where the gradient of
    those coordinates is non-zero (an L2 term in the loss)."""
    torch.manual_seed(0)
    if case == "padding_taps":
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4, 2))
        x = torch.randn(6, 3, 1, 1)  # 1x1 input: 8 of the 9 taps see only zero padding
    else:
        model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 2))
        x = torch.randn(6, 8)
        x[:, 2:] = 0.0  # inputs 2..7 are dead
    damping = 0.05
    pre = kfac.KFACPreconditioner(model, method=method, damping=damping, factor_decay=0.5, kl_clip=None,
                                  factor_dtype=torch.float64)
    for step in range(2):
        model.zero_grad()
        out = model(x)
        loss = out.pow(2).mean() + 0.1 * sum(p.pow(2).sum() for p in model.parameters())
        loss.backward()
        first = model[0]
        raw = grad_matrix_of(first).clone()
        pre.step()
    entry = pre.store["0"]
    key = "QA" if method == "eigen" else "A_inv"
    structure = entry.cache[key][1]
    assert structure is not None and structure.d.numel() >= entry.a_dim // 2  # the block-wise path ran
    assert raw[:, structure.d].abs().sum() > 0  # and the decoupled columns carried gradient
    eye_a, eye_g = torch.eye(entry.a_dim), torch.eye(entry.g_dim)
    if method == "eigen":
        dense = torch.linalg.inv(torch.kron(entry.A, entry.G) + damping * torch.eye(entry.a_dim * entry.g_dim))
    else:
        dense = torch.kron(torch.linalg.inv(entry.A + damping * eye_a), torch.linalg.inv(entry.G + damping * eye_g))
    torch.testing.assert_close(vec(grad_matrix_of(first)), dense @ vec(raw), rtol=1e-9, atol=1e-12)
