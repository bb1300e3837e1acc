"""The reference math: hand-written backward against autograd, the paper code's formulation, the dropout mask."""

import pytest
import torch

from condlora_kernels import reference
from condlora_kernels.testing import make_problem

F64 = torch.float64


def _autograd_grads(problem, dropout_p, seed):
    """Gradients by autograd through reference.condlora_forward (the yardstick for the hand-written backward)."""
    p = problem
    x = p.x.reshape(-1, p.x.shape[-1]).clone().requires_grad_(True)
    ta = p.theta_a.clone().requires_grad_(True)
    tb = p.theta_b.clone().requires_grad_(True)
    b = p.bias.clone().requires_grad_(True) if p.bias is not None else None
    out = reference.condlora_forward(x, p.weight, b, ta, tb, p.scaling, dropout_p, seed, p.mode)
    grad_y = torch.randn_like(out.y)
    out.y.backward(grad_y)
    return out, grad_y, (x.grad, ta.grad, tb.grad, b.grad if b is not None else None)


@pytest.mark.parametrize("mode,d_in,d_out", [("paper", 24, 24), ("general", 20, 28), ("general", 28, 20)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_hand_written_backward_matches_autograd(mode, d_in, d_out, dropout_p, bias):
    problem = make_problem(13, d_in, d_out, 3, mode=mode, bias=bias, dtype=F64, seed=1)
    seed = torch.tensor([987654321], dtype=torch.int64)
    out, grad_y, auto = _autograd_grads(problem, dropout_p, seed)
    x2d = problem.x.reshape(-1, d_in)
    hand = reference.condlora_backward(grad_y, x2d, problem.weight, problem.theta_a, problem.theta_b, out.u.detach(),
                                       out.lora_a.detach(), out.lora_b.detach(), problem.scaling, dropout_p, seed,
                                       mode, needs=(True, True, True, bias))
    for name, got, want in zip(("dx", "dtheta_a", "dtheta_b", "db"), hand, auto):
        if want is None:
            assert got is None
            continue
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


def test_needs_skips_gradients():
    problem = make_problem(5, 8, 8, 2, mode="paper", dtype=F64)
    out, grad_y, _ = _autograd_grads(problem, 0.0, None)
    grads = reference.condlora_backward(grad_y, problem.x, problem.weight, problem.theta_a, problem.theta_b, out.u,
                                        out.lora_a, out.lora_b, 2.0, needs=(False, True, False, False))
    assert grads.grad_x is None and grads.grad_theta_b is None and grads.grad_bias is None
    assert grads.grad_theta_a is not None


def test_paper_mode_equals_paper_code():
    """Paper mode is exactly `linear_for_lora_A(W0).T`, `linear_for_lora_B(W0)` of the paper's code."""
    p = make_problem(11, 16, 16, 4, mode="paper", dtype=F64, seed=3)
    ours = reference.condlora_forward(p.x, p.weight, p.bias, p.theta_a, p.theta_b, p.scaling, mode="paper").y
    theirs = reference.paper_code_condlora(p.x, p.weight, p.bias, p.theta_a, p.theta_b, p.scaling)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    # and the generated matrices are the nn.Linear maps applied to W0
    lin_a = torch.nn.Linear(16, 4, bias=False, dtype=F64)
    lin_b = torch.nn.Linear(16, 4, bias=False, dtype=F64)
    with torch.no_grad():
        lin_a.weight.copy_(p.theta_a)
        lin_b.weight.copy_(p.theta_b)
    lora_a, lora_b = reference.generate_lora_weights(p.weight, p.theta_a, p.theta_b, "paper")
    torch.testing.assert_close(lora_a, lin_a(p.weight).T)
    torch.testing.assert_close(lora_b, lin_b(p.weight))


def test_general_mode_shapes():
    p = make_problem(3, 12, 20, 5, mode="general", dtype=F64)
    lora_a, lora_b = reference.generate_lora_weights(p.weight, p.theta_a, p.theta_b, "general")
    assert lora_a.shape == (5, 12) and lora_b.shape == (20, 5)
    torch.testing.assert_close(lora_a, p.theta_a @ p.weight)


def test_philox_matches_known_answer():
    """Philox4x32-10 known-answer vector (Random123 kat_vectors: ctr=0, key=0)."""
    words = reference.philox_uint32_x4(torch.tensor([0], dtype=torch.int64), torch.tensor([0], dtype=torch.int64))
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    # ctr=(0xffffffff, 0xffffffff, 0, 0) is not a published vector; check the 64-bit offset split instead:
    # offsets that differ only above bit 32 must give different draws
    offs = torch.tensor([5, 5 + (1 << 32)], dtype=torch.int64)
    a, b = reference.philox_uint32(torch.tensor([7], dtype=torch.int64), offs)
    assert int(a) != int(b)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_rate_and_determinism(p):
    seed = torch.tensor([42], dtype=torch.int64)
    m1 = reference.dropout_keep_mask(seed, 64, 1000, p)
    m2 = reference.dropout_keep_mask(seed, 64, 1000, p)
    m3 = reference.dropout_keep_mask(torch.tensor([43], dtype=torch.int64), 64, 1000, p)
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, m3)
    keep = m1.double().mean().item()
    assert abs(keep - (1 - p)) < 4 * ((p * (1 - p) / m1.numel()) ** 0.5) + 1e-3


def test_dropout_draw_layout():
    """Element (row, col) is half-word col % 8 of counter row * ceil(n_cols / 8) + col // 8."""
    seed = torch.tensor([9], dtype=torch.int64)
    n_cols = 13  # not a multiple of 8: each row starts a fresh counter
    draws = reference.dropout_draws(seed, torch.arange(3), torch.arange(n_cols), n_cols)
    words = reference.philox_uint32_x4(seed, torch.tensor([2 * 2 + 1]))  # row 2, columns 8..15
    assert int(draws[2, 8]) == int(words[0]) & 0xFFFF and int(draws[2, 9]) == int(words[0]) >> 16
    assert int(draws[2, 12]) == int(words[2]) & 0xFFFF
    # a tile computes its own draws: any sub-block equals the same block of the whole
    sub = reference.dropout_draws(seed, torch.arange(1, 3), torch.arange(5, 13), n_cols)
    assert torch.equal(sub, draws[1:3, 5:13])


def test_dropout_scales_kept_entries():
    x = torch.randn(7, 9, dtype=F64)
    seed = torch.tensor([5], dtype=torch.int64)
    xh = reference.apply_dropout(x, seed, 0.25)
    keep = reference.dropout_keep_mask(seed, 7, 9, 0.25)
    torch.testing.assert_close(xh[keep], x[keep] * reference.dropout_keep_scale(0.25))
    assert reference.dropout_keep_scale(0.25) == 1 / 0.75  # 0.25 is exact in 16 bits
    assert torch.all(xh[~keep] == 0)
    assert reference.apply_dropout(x, None, 0.0) is x
