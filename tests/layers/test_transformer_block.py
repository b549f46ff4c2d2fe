"""The drop-in layers in a user's model: a 2-block transformer on ``[b, n, d]`` whose attention
is torch's (``scaled_dot_product_attention``), whose projections are ``SparseLinear`` and whose
feed-forward blocks are ``MoE``; trained, compiled, autocast and exported."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuroplex.layers import MoE, SparseLinear, moe_aux_loss
from neuroplex.wiring import modular

VOCAB, D, HEADS, N = 8, 32, 4, 16


def projection(sparse: bool) -> nn.Module:
    """``[*, D] -> [*, D]``: a modular SparseLinear (4 ensembles, each wired to 2) or nn.Linear."""
    return SparseLinear(modular(D, D, 4, 1, "ring")) if sparse else nn.Linear(D, D)


class Attention(nn.Module):
    """Causal multi-head self-attention ``[b, n, D] -> [b, n, D]``."""

    def __init__(self, sparse: bool):
        super().__init__()
        self.q, self.k, self.v, self.o = (projection(sparse) for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (
            p(x).view(b, n, HEADS, D // HEADS).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [b, heads, n, D / heads]
        return self.o(y.transpose(1, 2).reshape(b, n, D))


class Block(nn.Module):
    def __init__(self, sparse: bool):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = Attention(sparse)
        self.ffn = MoE(D, D, 4, 2, 2 * D)  # the default router: noisy top-k

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class Transformer(nn.Module):
    """Token ids ``[b, n]`` -> logits ``[b, n, VOCAB]``."""

    def __init__(self, sparse: bool = True):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, D), nn.Embedding(N, D)
        self.blocks = nn.Sequential(Block(sparse), Block(sparse))
        self.head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, VOCAB))

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.head(self.blocks(x))


def previous_tokens(gen: torch.Generator, b: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The toy task: at every position, output the token before it (the first: itself)."""
    ids = torch.randint(0, VOCAB, (b, N), generator=gen)
    return ids, torch.cat([ids[:, :1], ids[:, :-1]], dim=1)


def loss_of(model, ids, target):
    logits = model(ids)
    return F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1)) + moe_aux_loss(model)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: threads only add overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_trains_on_a_toy_sequence_task():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = Transformer()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = loss_of(model, *previous_tokens(gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:3]) / 3  # ln 8 = 2.08 at chance
    assert all(m.aux_loss.item() > 0 for m in model.modules() if isinstance(m, MoE))


def _outputs_and_grads(model, ids, target, call=None):
    model.zero_grad()
    logits = (model if call is None else call)(ids)
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1)) + moe_aux_loss(model)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def test_compiled_matches_eager_outputs_and_gradients():
    # eval mode: no router noise, so both see the same function. The default backend
    # (inductor); the dropless MoE has its one documented graph break.
    torch.manual_seed(0)
    model = Transformer().eval()
    ids, target = previous_tokens(torch.Generator().manual_seed(1))
    want_y, want_g = _outputs_and_grads(model, ids, target)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    got_y, got_g = _outputs_and_grads(model, ids, target, call=compiled)
    torch.testing.assert_close(got_y, want_y, atol=1e-5, rtol=1e-5)
    assert got_g.keys() == want_g.keys() and len(want_g) >= 40  # all but the noise weights
    for name, g in want_g.items():
        torch.testing.assert_close(got_g[name], g, atol=1e-5, rtol=1e-5, msg=name)


def _autocast_step(model):
    ids, target = previous_tokens(torch.Generator().manual_seed(2))
    ref = copy.deepcopy(model)
    with torch.autocast("cpu", torch.bfloat16):
        loss = loss_of(model, ids, target)
    loss.backward()
    want = loss_of(ref, ids, target)
    assert torch.isfinite(loss) and abs(loss.item() - want.item()) < 0.05
    grads = [p.grad for n, p in model.named_parameters() if "w_noise" not in n]  # eval: no noise
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bf16_autocast_forward_and_backward_with_dense_projections():
    torch.manual_seed(0)
    _autocast_step(Transformer(sparse=False).eval())


def test_bf16_autocast_forward_and_backward_with_sparse_projections():
    torch.manual_seed(0)
    _autocast_step(Transformer().eval())


def test_exported_for_inference_matches_eager():
    torch.manual_seed(0)
    model = Transformer().eval()
    ids, _ = previous_tokens(torch.Generator().manual_seed(3))
    program = torch.export.export(model, (ids,))
    other, _ = previous_tokens(torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(other), model(other))
