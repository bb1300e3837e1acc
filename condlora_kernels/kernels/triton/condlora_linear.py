"""Fused Triton kernels for CondLoRA: the whole forward in one launch, the whole backward in one launch.

Contents, top to bottom: jit helpers (dropout mask, dependency flags, tile schedule), the forward
kernel, the backward kernel, the launchers (sizes, configs, workspaces), the torch.library
registration (`triton_op` + `wrap_triton`, so torch.compile traces them), and `TritonBackend`, which
the autograd Function in ops/condlora_linear.py calls.

Notation: N tokens (rows of x), d_in, d_out, rank r (padded to R_PAD >= 16 for tl.dot), s = alpha / r,
x_hat = dropout(x), A = lora_a (r, d_in), B = lora_b (d_out, r), u = x_hat A^T (N, r).

Design: one persistent launch per direction, with a grid of at most one program per SM. The work is a
list of *tiles* of a few kinds, laid out so that every tile depends only on tiles that come earlier in
the list; program p takes tiles p, p + P, p + 2P, ... A tile that needs another's result spins on a
flag in global memory (acquire) that the producer sets after its stores (barrier, then release). Since
all P programs are resident at once and dependencies point backwards, the lowest unfinished tile can
always run: no deadlock. Under TRITON_INTERPRET programs run one after another, so P = 1 there.

The output tiles come in groups of GROUP_M row blocks (grouped order keeps the x and W0 tiles a wave
reads in L2). Each row block has one *head* tile with the rank-r work for it, and the heads of group
g + 1 are listed before the output tiles of group g: heads run one group ahead, so an output tile's
epilogue finds its head's result ready instead of waiting for it.

Forward (y = x W0^T + b + s u B^T):
    GEN      B = W0 theta_b^T row blocks (and A^T = W0 theta_a^T rows in paper mode);
             in general mode also A^T = W0^T theta_a^T column blocks.            reads W0 once
    U(m)     head: u[m] = x_hat[m] A^T, stored for the backward; waits for every GEN tile.
    Y(m, n)  the frozen GEMM x[m] W0[n]^T; the epilogue waits for U(m), then adds
             (s u[m]) B[n]^T as one more MMA (K = R_PAD) into the same accumulator, + bias.
The rank-r work thus happens once per row block (U) and once per weight row block (GEN), not once per
output tile.

Backward, chain rule (DESIGN.md §2):  v = dy B;  dx = dy W0 + s (v A) * M/(1-p);  dA = s v^T x_hat;
dB = s dy^T u;  dtheta_b = dB^T W0;  dtheta_a = dA W0 (paper) | dA W0^T (general);  db = sum_rows dy.
    V(m)     head: one pass over dy[m]: v[m] = dy[m] B (stores s v[m]), and the partial sums
             s dy[m]^T u[m] (of dB) and sum_rows dy[m] (of db) into slot m mod S.
    DX(m, k) the input-gradient GEMM dy[m] W0[:, k]; the epilogue waits for V(m), adds (s v[m]) A[:, k]
             times the mask, and, from the x tile at the same place, the partial sum s v[m]^T x_hat[m, k]
             of dA (one dropout mask serves both). Without dx it only does the latter.
    RED      sums the S slots in a fixed order into dA, dB (float32) and db; waits for every partial.
    DTHETA   dtheta = [dA; dB^T] W0 (paper) or dA W0^T, dB^T W0 (general); waits for every RED.
Partial sums go to S float32 slots; when memory allows S = the number of row blocks and every slot is
written once. With fewer slots, blocks m, m + S, ... take turns on a slot in order of m. Either way each
sum is formed in an order that does not depend on scheduling: same inputs, bitwise the same gradients.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from condlora_kernels import reference

# ==================================================================================================
# jit helpers
# ==================================================================================================


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (uint32 counters c0..c3, key k0, k1), as reference.philox_uint32_x4."""
    for _ in tl.static_range(10):
        c0_prev = c0
        c2_prev = c2
        c0 = tl.umulhi(c2_prev, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(c0_prev, 0xD2511F53) ^ c3 ^ k1
        c1 = c2_prev * 0xCD9E8D57
        c3 = c0_prev * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _dropout_keep(seed_lo, seed_hi, rows, col_start, d_in, drop_threshold,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Keep mask of the tile x[rows, col_start : col_start + BLOCK_C] (col_start a multiple of 8).

    As reference.dropout_draws: element (row, col) takes half-word col % 8 of the Philox counter
    row * ceil(d_in / 8) + col // 8, so one Philox call serves 8 elements; keep when draw >= threshold.
    """
    groups = (d_in + 7) // 8
    counter = rows[:, None].to(tl.int64) * groups + (col_start // 8 + tl.arange(0, BLOCK_C // 8))[None, :]
    lo = counter.to(tl.uint32)
    hi = (counter >> 32).to(tl.uint32)
    w0, w1, w2, w3 = _philox(lo, hi, lo * 0, lo * 0, seed_lo, seed_hi)
    # half-words in column order (w0 lo, w0 hi, w1 lo, w1 hi, ..., w3 hi). tl.join adds its new axis as
    # the fastest one, so the outermost join picks lo/hi, the next w0|w2 vs w1|w3, the innermost w0 vs w2:
    # element [..., a, b, c] is half-word 4a + 2b + c.
    lows = tl.join(tl.join(w0 & 0xFFFF, w2 & 0xFFFF), tl.join(w1 & 0xFFFF, w3 & 0xFFFF))
    highs = tl.join(tl.join(w0 >> 16, w2 >> 16), tl.join(w1 >> 16, w3 >> 16))
    draws = tl.reshape(tl.join(lows, highs), (BLOCK_R, BLOCK_C))
    return draws.to(tl.int32) >= drop_threshold


@triton.jit
def _load_seed(seed_ptr):
    seed = tl.load(seed_ptr)
    return seed.to(tl.uint32), (seed >> 32).to(tl.uint32)


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, SPLIT_ACC: tl.constexpr):
    """acc + a @ b. For float32 data (SPLIT_ACC) each BLOCK_K slice is summed on its own and then
    added: Triton's IEEE float32 dot accumulates serially over K, and two levels keep its rounding
    error near cuBLAS's instead of growing with all of K."""
    if SPLIT_ACC:
        return acc + tl.dot(a, b, input_precision=DOT_PRECISION)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _wait_at_least(flag_ptr, target):
    """Spin until *flag_ptr >= target (acquire: the producer's stores are visible afterwards)."""
    while tl.atomic_add(flag_ptr, 0, sem="acquire") < target:
        pass


@triton.jit
def _signal(flag_ptr):
    """Publish this tile's stores: every thread's stores complete (barrier), then a release increment."""
    tl.debug_barrier()
    tl.atomic_add(flag_ptr, 1, sem="release")


@triton.jit
def _exit_and_reset_flags(flags_ptr, num_flags, num_programs, FLAG_BLOCK: tl.constexpr):
    """The last program to finish zeroes the flags, so a rerun of the same launch (autotuning, graph
    replay) starts clean. Slot 0 counts finished programs."""
    tl.debug_barrier()
    finished = tl.atomic_add(flags_ptr, 1, sem="acq_rel")
    if finished == num_programs - 1:
        offs = tl.arange(0, FLAG_BLOCK)
        for start in range(0, num_flags, FLAG_BLOCK):
            tl.store(flags_ptr + start + offs, 0, mask=start + offs < num_flags)


@triton.jit
def _lookahead_tile(t, num_row_blocks, num_cols, GROUP_M: tl.constexpr):
    """Decode tile t of the schedule  H(0) | H(1) O(0) | H(2) O(1) | ... | H(G) O(G-1),
    where H(g) are the GROUP_M head tiles of group g and O(g) its output tiles, row block fastest.
    Every H has GROUP_M tiles (those past the last row block, and all of H(G), do nothing), so every
    segment H(g + 1) O(g) but the last has the same size and t decodes with one division.
    (G + 1) * GROUP_M + num_row_blocks * num_cols tiles in all.
    Returns (kind, row_block, col_block) with kind 0 = head, 1 = output, 2 = nothing to do."""
    seg = GROUP_M * (1 + num_cols)  # one H(g + 1) O(g) segment of full groups
    t2 = t - GROUP_M
    g = tl.maximum(t2, 0) // seg  # t2 >= 0: segment g holds H(g + 1), then O(g)
    local = t2 - g * seg
    is_first_heads = t < GROUP_M
    is_head = is_first_heads | (local < GROUP_M)
    head_row = tl.where(is_first_heads, t, (g + 1) * GROUP_M + local)
    j = tl.maximum(local - GROUP_M, 0)
    rows_in_group = tl.minimum(num_row_blocks - g * GROUP_M, GROUP_M)
    out_row = g * GROUP_M + j % tl.maximum(rows_in_group, 1)
    out_col = j // tl.maximum(rows_in_group, 1)
    row_block = tl.where(is_head, head_row, out_row)
    kind = tl.where(is_head, 0, 1)
    kind = tl.where(row_block < num_row_blocks, kind, 2)
    return kind, row_block, out_col


# ==================================================================================================
# forward kernel
# ==================================================================================================


@triton.jit
def _fwd_gen_rows(w_ptr, ta_ptr, tb_ptr, a_ptr, b_ptr, tile, d_in, d_out, rank,
                  stride_wn, stride_wk, stride_ta, stride_tb,
                  MODE_PAPER: tl.constexpr, GEN_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                  R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_ACC: tl.constexpr):
    """B[rows] = W0[rows] theta_b^T; in paper mode also A^T[rows] = W0[rows] theta_a^T (same W0 tiles)."""
    ACC: tl.constexpr = tl.float64 if w_ptr.dtype.element_ty == tl.float64 else tl.float32  # f64: gradcheck only
    rows = tile * GEN_BLOCK + tl.arange(0, GEN_BLOCK)
    ranks = tl.arange(0, R_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    acc_b = tl.zeros((GEN_BLOCK, R_PAD), dtype=ACC)
    acc_a = tl.zeros((GEN_BLOCK, R_PAD), dtype=ACC)
    for k0 in range(0, d_in, BLOCK_K):
        ks = k0 + offs_k
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_wn + ks[None, :] * stride_wk,
                    mask=(rows[:, None] < d_out) & (ks[None, :] < d_in), other=0.0)
        theta_mask = (ks[:, None] < d_in) & (ranks[None, :] < rank)
        tb_t = tl.load(tb_ptr + ranks[None, :] * stride_tb + ks[:, None], mask=theta_mask, other=0.0)
        acc_b = _mma(w, tb_t, acc_b, DOT_PRECISION, SPLIT_ACC)
        if MODE_PAPER:
            ta_t = tl.load(ta_ptr + ranks[None, :] * stride_ta + ks[:, None], mask=theta_mask, other=0.0)
            acc_a = _mma(w, ta_t, acc_a, DOT_PRECISION, SPLIT_ACC)
    out_mask = (rows[:, None] < d_out) & (ranks[None, :] < rank)
    tl.store(b_ptr + rows[:, None] * rank + ranks[None, :], acc_b.to(b_ptr.dtype.element_ty), mask=out_mask)
    if MODE_PAPER:  # square W0: rows of W0 index the d_in columns of A
        tl.store(a_ptr + ranks[None, :] * d_in + rows[:, None], acc_a.to(a_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _fwd_gen_cols(w_ptr, ta_ptr, a_ptr, tile, d_in, d_out, rank, stride_wn, stride_wk, stride_ta,
                  GEN_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, SPLIT_ACC: tl.constexpr):
    """General mode: A^T[cols] = W0[:, cols]^T theta_a^T, a reduction over the d_out rows of W0."""
    ACC: tl.constexpr = tl.float64 if w_ptr.dtype.element_ty == tl.float64 else tl.float32
    cols = tile * GEN_BLOCK + tl.arange(0, GEN_BLOCK)
    ranks = tl.arange(0, R_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((GEN_BLOCK, R_PAD), dtype=ACC)
    for k0 in range(0, d_out, BLOCK_K):
        ks = k0 + offs_k
        w = tl.load(w_ptr + ks[:, None].to(tl.int64) * stride_wn + cols[None, :] * stride_wk,
                    mask=(ks[:, None] < d_out) & (cols[None, :] < d_in), other=0.0)
        ta_t = tl.load(ta_ptr + ranks[None, :] * stride_ta + ks[:, None],
                       mask=(ks[:, None] < d_out) & (ranks[None, :] < rank), other=0.0)
        acc = _mma(tl.trans(w), ta_t, acc, DOT_PRECISION, SPLIT_ACC)
    tl.store(a_ptr + ranks[None, :] * d_in + cols[:, None], acc.to(a_ptr.dtype.element_ty),
             mask=(cols[:, None] < d_in) & (ranks[None, :] < rank))


@triton.jit
def _fwd_u_tile(x_ptr, a_ptr, u_ptr, m, n_rows, d_in, rank, stride_xm, stride_xk,
                seed_lo, seed_hi, drop_threshold, keep_scale,
                HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_ACC: tl.constexpr):
    """u[rows] = x_hat[rows] A^T, stored in x's dtype (the backward and the Y epilogues read it back)."""
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=ACC)
    for k0 in range(0, d_in, BLOCK_K):
        ks = k0 + offs_k
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=(rows[:, None] < n_rows) & (ks[None, :] < d_in),
                    other=0.0)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed_lo, seed_hi, rows, k0, d_in, drop_threshold, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x.to(ACC) * keep_scale, 0.0).to(x.dtype)
        # A was written in this launch by other programs: read through L2 (.cg), never a stale L1 line
        a_t = tl.load(a_ptr + ranks[None, :] * d_in + ks[:, None], mask=(ks[:, None] < d_in) & (ranks[None, :] < rank),
                      other=0.0, cache_modifier=".cg")
        acc = _mma(x, a_t, acc, DOT_PRECISION, SPLIT_ACC)
    tl.store(u_ptr + rows[:, None].to(tl.int64) * rank + ranks[None, :], acc.to(u_ptr.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (ranks[None, :] < rank))


@triton.jit
def _fwd_y_tile(x_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, y_ptr, u_ready_ptr, m, n, n_rows, d_in, d_out, rank,
                stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, scaling,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_ACC: tl.constexpr):
    """y[m, n] = x[m] W0[n]^T + (s u[m]) B[n]^T + b[n]."""
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, d_in, BLOCK_K):
        x = tl.load(x_ptrs, mask=(rows[:, None] < n_rows) & (offs_k[None, :] < d_in - k0), other=0.0)
        w = tl.load(w_ptrs, mask=(cols[None, :] < d_out) & (offs_k[:, None] < d_in - k0), other=0.0)
        acc = _mma(x, w, acc, DOT_PRECISION, SPLIT_ACC)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # epilogue: the low-rank term is one more MMA into the same accumulator
    _wait_at_least(u_ready_ptr + m, 1)  # U(m) done (and, before it, every GEN tile)
    ranks = tl.arange(0, R_PAD)
    u = tl.load(u_ptr + rows[:, None].to(tl.int64) * rank + ranks[None, :],
                mask=(rows[:, None] < n_rows) & (ranks[None, :] < rank), other=0.0, cache_modifier=".cg")
    b_t = tl.load(b_ptr + cols[None, :] * rank + ranks[:, None], mask=(cols[None, :] < d_out) & (ranks[:, None] < rank),
                  other=0.0, cache_modifier=".cg")
    u_scaled = (u.to(ACC) * scaling).to(u.dtype)
    acc = tl.dot(u_scaled, b_t, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < d_out, other=0.0).to(ACC)[None, :]
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < d_out))


@triton.jit
def _condlora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, ta_ptr, tb_ptr, y_ptr, u_ptr, a_ptr, b_ptr, flags_ptr, seed_ptr,
    n_rows, d_in, d_out, rank,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ta, stride_tb, stride_ym, stride_yn,
    scaling, keep_scale, drop_threshold, num_programs,
    MODE_PAPER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    GEN_BLOCK: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_ACC: tl.constexpr,
    FLAG_BLOCK: tl.constexpr,
):
    """Persistent forward: GEN tiles, then U heads one group ahead of their Y tiles.
    flags: [0] finished programs, [1] finished GEN tiles, [2 + m] U(m) done."""
    num_gen_rows = tl.cdiv(d_out, GEN_BLOCK)
    num_gen = num_gen_rows if MODE_PAPER else num_gen_rows + tl.cdiv(d_in, GEN_BLOCK)
    num_m = tl.cdiv(n_rows, BLOCK_M)
    num_n = tl.cdiv(d_out, BLOCK_N)
    num_tiles = num_gen + (tl.cdiv(num_m, GROUP_M) + 1) * GROUP_M + num_m * num_n
    gen_done_ptr = flags_ptr + 1
    u_ready_ptr = flags_ptr + 2
    seed_lo = 0
    seed_hi = 0
    if HAS_DROPOUT:
        seed_lo, seed_hi = _load_seed(seed_ptr)

    for t in range(tl.program_id(0), num_tiles, num_programs):
        if t < num_gen:
            if t < num_gen_rows:
                _fwd_gen_rows(w_ptr, ta_ptr, tb_ptr, a_ptr, b_ptr, t, d_in, d_out, rank, stride_wn, stride_wk,
                              stride_ta, stride_tb, MODE_PAPER, GEN_BLOCK, BLOCK_K, R_PAD, DOT_PRECISION, SPLIT_ACC)
            else:
                _fwd_gen_cols(w_ptr, ta_ptr, a_ptr, t - num_gen_rows, d_in, d_out, rank, stride_wn, stride_wk,
                              stride_ta, GEN_BLOCK, BLOCK_K, R_PAD, DOT_PRECISION, SPLIT_ACC)
            _signal(gen_done_ptr)
        else:
            kind, m, n = _lookahead_tile(t - num_gen, num_m, num_n, GROUP_M)
            if kind == 0:
                _wait_at_least(gen_done_ptr, num_gen)
                _fwd_u_tile(x_ptr, a_ptr, u_ptr, m, n_rows, d_in, rank, stride_xm, stride_xk, seed_lo, seed_hi,
                            drop_threshold, keep_scale, HAS_DROPOUT, BLOCK_M, BLOCK_K, R_PAD, DOT_PRECISION,
                            SPLIT_ACC)
                _signal(u_ready_ptr + m)
            elif kind == 1:
                _fwd_y_tile(x_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, y_ptr, u_ready_ptr, m, n, n_rows, d_in, d_out,
                            rank, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, scaling,
                            HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, R_PAD, DOT_PRECISION, SPLIT_ACC)
    _exit_and_reset_flags(flags_ptr, 2 + num_m, num_programs, FLAG_BLOCK)


# ==================================================================================================
# backward kernel
# ==================================================================================================


@triton.jit
def _bwd_v_tile(dy_ptr, b_ptr, u_ptr, sv_ptr, part_b_ptr, part_db_ptr, ticket_ptr, m, num_slots, num_m,
                n_rows, d_out, rank, stride_dym, stride_dyn, scaling,
                NEED_DTHETA: tl.constexpr, NEED_DBIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_ACC: tl.constexpr):
    """One pass over dy[m]: v[m] = dy[m] B, stored as s v[m] in the input dtype; the partial sums
    s dy[m]^T u[m] (of dB) and sum_rows dy[m] (of db) into slot m mod S."""
    ACC: tl.constexpr = tl.float64 if dy_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = rows < n_rows
    slot = m % num_slots
    turn = m // num_slots
    shared_slots = num_slots < num_m
    if (NEED_DTHETA or NEED_DBIAS) and shared_slots:  # blocks m - S, m - 2S, ... added into this slot first
        _wait_at_least(ticket_ptr + slot, turn)
    if NEED_DTHETA:
        u = tl.load(u_ptr + rows[:, None].to(tl.int64) * rank + ranks[None, :],
                    mask=row_mask[:, None] & (ranks[None, :] < rank), other=0.0)
    dy_rows = dy_ptr + rows[:, None].to(tl.int64) * stride_dym
    v = tl.zeros((BLOCK_M, R_PAD), dtype=ACC)
    for c0 in range(0, d_out, BLOCK_K):
        cs = c0 + offs_k
        dy = tl.load(dy_rows + cs[None, :] * stride_dyn, mask=row_mask[:, None] & (cs[None, :] < d_out), other=0.0)
        b = tl.load(b_ptr + cs[:, None] * rank + ranks[None, :], mask=(cs[:, None] < d_out) & (ranks[None, :] < rank),
                    other=0.0)
        v = _mma(dy, b, v, DOT_PRECISION, SPLIT_ACC)
        if NEED_DTHETA:
            part = tl.dot(tl.trans(dy), u, input_precision=DOT_PRECISION) * scaling  # (BLOCK_K, R_PAD)
            p_ptrs = part_b_ptr + (slot * d_out + cs[:, None]) * R_PAD + ranks[None, :]
            if turn > 0:
                part += tl.load(p_ptrs, mask=cs[:, None] < d_out, other=0.0, cache_modifier=".cg")
            tl.store(p_ptrs, part, mask=cs[:, None] < d_out)
        if NEED_DBIAS:
            db = tl.sum(dy.to(ACC), axis=0)
            db_ptrs = part_db_ptr + slot * d_out + cs
            if turn > 0:
                db += tl.load(db_ptrs, mask=cs < d_out, other=0.0, cache_modifier=".cg")
            tl.store(db_ptrs, db, mask=cs < d_out)
    # s v in the input dtype (v rounded first, as the reference rounds it): DX uses it for dx and dA
    sv = (v.to(dy_ptr.dtype.element_ty).to(ACC) * scaling).to(sv_ptr.dtype.element_ty)
    tl.store(sv_ptr + rows[:, None].to(tl.int64) * R_PAD + ranks[None, :], sv, mask=row_mask[:, None])
    if (NEED_DTHETA or NEED_DBIAS) and shared_slots:
        tl.debug_barrier()
        tl.atomic_xchg(ticket_ptr + slot, turn + 1, sem="release")


@triton.jit
def _bwd_dx_tile(dy_ptr, x_ptr, w_ptr, a_ptr, sv_ptr, dx_ptr, part_a_ptr, v_ready_ptr, ticket_ptr,
                 m, k, num_slots, num_m, num_k, n_rows, d_in, d_out, rank,
                 stride_dym, stride_dyn, stride_xm, stride_xk, stride_wn, stride_wk, stride_dxm, stride_dxk,
                 seed_lo, seed_hi, drop_threshold, keep_scale,
                 NEED_DX: tl.constexpr, NEED_DTHETA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, SPLIT_ACC: tl.constexpr):
    """dx[m, k] = dy[m] W0[:, k] + ((s v[m]) A[:, k]) * M / (1 - p), and the partial sum
    (s v[m])^T x_hat[m, k] of dA into slot m mod S (the same mask M serves both)."""
    ACC: tl.constexpr = tl.float64 if dy_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = k * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of dx and x: the d_in axis
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if NEED_DX:
        offs_c = tl.arange(0, BLOCK_K)  # the reduction runs over d_out
        dy_ptrs = dy_ptr + rows[:, None].to(tl.int64) * stride_dym + offs_c[None, :] * stride_dyn
        w_ptrs = w_ptr + offs_c[:, None].to(tl.int64) * stride_wn + cols[None, :] * stride_wk
        for c0 in range(0, d_out, BLOCK_K):
            dy = tl.load(dy_ptrs, mask=(rows[:, None] < n_rows) & (offs_c[None, :] < d_out - c0), other=0.0)
            w = tl.load(w_ptrs, mask=(offs_c[:, None] < d_out - c0) & (cols[None, :] < d_in), other=0.0)
            acc = _mma(dy, w, acc, DOT_PRECISION, SPLIT_ACC)
            dy_ptrs += BLOCK_K * stride_dyn
            w_ptrs += BLOCK_K * stride_wn

    _wait_at_least(v_ready_ptr + m, 1)
    ranks = tl.arange(0, R_PAD)
    tile_mask = (rows[:, None] < n_rows) & (cols[None, :] < d_in)
    sv = tl.load(sv_ptr + rows[:, None].to(tl.int64) * R_PAD + ranks[None, :], mask=rows[:, None] < n_rows,
                 other=0.0, cache_modifier=".cg")
    if HAS_DROPOUT:
        keep = _dropout_keep(seed_lo, seed_hi, rows, k * BLOCK_N, d_in, drop_threshold, BLOCK_M, BLOCK_N)
    if NEED_DX:
        a = tl.load(a_ptr + ranks[:, None] * d_in + cols[None, :], mask=(ranks[:, None] < rank) & (cols[None, :] < d_in),
                    other=0.0)
        if HAS_DROPOUT:
            low_rank = tl.dot(sv, a, input_precision=DOT_PRECISION)
            acc += tl.where(keep, low_rank * keep_scale, 0.0)
        else:
            acc = tl.dot(sv, a, acc, input_precision=DOT_PRECISION)
        tl.store(dx_ptr + rows[:, None].to(tl.int64) * stride_dxm + cols[None, :] * stride_dxk,
                 acc.to(dx_ptr.dtype.element_ty), mask=tile_mask)
    if NEED_DTHETA:
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :] * stride_xk, mask=tile_mask,
                    other=0.0)
        if HAS_DROPOUT:
            x = tl.where(keep, x.to(ACC) * keep_scale, 0.0).to(x.dtype)
        part = tl.dot(tl.trans(sv), x, input_precision=DOT_PRECISION)  # (R_PAD, BLOCK_N)
        slot = m % num_slots
        turn = m // num_slots
        p_ptrs = part_a_ptr + (slot * R_PAD + ranks[:, None]) * d_in + cols[None, :]
        if num_slots < num_m:  # take turns on the slot, in order of m, per column block
            _wait_at_least(ticket_ptr + slot * num_k + k, turn)
            if turn > 0:
                part += tl.load(p_ptrs, mask=cols[None, :] < d_in, other=0.0, cache_modifier=".cg")
            tl.store(p_ptrs, part, mask=cols[None, :] < d_in)
            tl.debug_barrier()
            tl.atomic_xchg(ticket_ptr + slot * num_k + k, turn + 1, sem="release")
        else:
            tl.store(p_ptrs, part, mask=cols[None, :] < d_in)


@triton.jit
def _bwd_reduce_a(part_a_ptr, grad_a_ptr, tile, num_slots, d_in, RED_BLOCK: tl.constexpr, R_PAD: tl.constexpr):
    """dA[:, cols] = sum over slots, in slot order."""
    cols = tile * RED_BLOCK + tl.arange(0, RED_BLOCK)
    ranks = tl.arange(0, R_PAD)
    acc = tl.zeros((R_PAD, RED_BLOCK), dtype=grad_a_ptr.dtype.element_ty)
    for slot in range(0, num_slots):
        acc += tl.load(part_a_ptr + (slot * R_PAD + ranks[:, None]) * d_in + cols[None, :],
                       mask=cols[None, :] < d_in, other=0.0, cache_modifier=".cg")
    tl.store(grad_a_ptr + ranks[:, None] * d_in + cols[None, :], acc, mask=cols[None, :] < d_in)


@triton.jit
def _bwd_reduce_b(part_b_ptr, part_db_ptr, grad_b_ptr, db_ptr, tile, num_slots, d_out,
                  NEED_DTHETA: tl.constexpr, NEED_DBIAS: tl.constexpr, RED_BLOCK: tl.constexpr, R_PAD: tl.constexpr):
    """dB[rows] and db[rows] = sums over slots, in slot order (db stored in its own dtype)."""
    rows = tile * RED_BLOCK + tl.arange(0, RED_BLOCK)
    ranks = tl.arange(0, R_PAD)
    if NEED_DTHETA:
        acc = tl.zeros((RED_BLOCK, R_PAD), dtype=grad_b_ptr.dtype.element_ty)
        for slot in range(0, num_slots):
            acc += tl.load(part_b_ptr + (slot * d_out + rows[:, None]) * R_PAD + ranks[None, :],
                           mask=rows[:, None] < d_out, other=0.0, cache_modifier=".cg")
        tl.store(grad_b_ptr + rows[:, None] * R_PAD + ranks[None, :], acc, mask=rows[:, None] < d_out)
    if NEED_DBIAS:
        acc_db = tl.zeros((RED_BLOCK,), dtype=part_db_ptr.dtype.element_ty)
        for slot in range(0, num_slots):
            acc_db += tl.load(part_db_ptr + slot * d_out + rows, mask=rows < d_out, other=0.0, cache_modifier=".cg")
        tl.store(db_ptr + rows, acc_db.to(db_ptr.dtype.element_ty), mask=rows < d_out)


@triton.jit
def _bwd_dtheta_tile(w_ptr, grad_a_ptr, grad_b_ptr, dta_ptr, dtb_ptr, tile, d_in, d_out, rank,
                     stride_wn, stride_wk, MODE_PAPER: tl.constexpr, DT_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                     R_PAD: tl.constexpr, F32_DOT_PRECISION: tl.constexpr, SPLIT_ACC: tl.constexpr):
    """Contract the reduced dA (R_PAD, d_in) and dB (d_out, R_PAD) with W0:
    tiles over the d_in columns: dtheta_b[:, cols] = dB^T W0[:, cols] (and, paper mode, dtheta_a = dA W0);
    general mode, tiles after those: dtheta_a[:, rows] = dA W0[rows]^T."""
    ACC: tl.constexpr = grad_a_ptr.dtype.element_ty  # float32 (float64 for gradcheck)
    ranks = tl.arange(0, R_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    num_col_tiles = tl.cdiv(d_in, DT_BLOCK)
    if tile < num_col_tiles:
        cols = tile * DT_BLOCK + tl.arange(0, DT_BLOCK)
        acc_b = tl.zeros((R_PAD, DT_BLOCK), dtype=ACC)
        acc_a = tl.zeros((R_PAD, DT_BLOCK), dtype=ACC)
        for k0 in range(0, d_out, BLOCK_K):  # contract over the rows of W0
            ks = k0 + offs_k
            w = tl.load(w_ptr + ks[:, None].to(tl.int64) * stride_wn + cols[None, :] * stride_wk,
                        mask=(ks[:, None] < d_out) & (cols[None, :] < d_in), other=0.0).to(ACC)
            gb_t = tl.load(grad_b_ptr + ks[None, :] * R_PAD + ranks[:, None], mask=ks[None, :] < d_out, other=0.0,
                           cache_modifier=".cg")
            acc_b = _mma(gb_t, w, acc_b, F32_DOT_PRECISION, SPLIT_ACC)
            if MODE_PAPER:  # square: the rows of W0 are the d_in columns of dA
                ga = tl.load(grad_a_ptr + ranks[:, None] * d_in + ks[None, :], mask=ks[None, :] < d_in, other=0.0,
                             cache_modifier=".cg")
                acc_a = _mma(ga, w, acc_a, F32_DOT_PRECISION, SPLIT_ACC)
        out_mask = (ranks[:, None] < rank) & (cols[None, :] < d_in)
        tl.store(dtb_ptr + ranks[:, None] * d_in + cols[None, :], acc_b.to(dtb_ptr.dtype.element_ty), mask=out_mask)
        if MODE_PAPER:
            tl.store(dta_ptr + ranks[:, None] * d_in + cols[None, :], acc_a.to(dta_ptr.dtype.element_ty), mask=out_mask)
    else:
        rows = (tile - num_col_tiles) * DT_BLOCK + tl.arange(0, DT_BLOCK)  # rows of W0: the d_out axis
        acc = tl.zeros((R_PAD, DT_BLOCK), dtype=ACC)
        for k0 in range(0, d_in, BLOCK_K):  # contract over the columns of W0
            ks = k0 + offs_k
            w_t = tl.load(w_ptr + rows[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk,
                          mask=(ks[:, None] < d_in) & (rows[None, :] < d_out), other=0.0).to(ACC)
            ga = tl.load(grad_a_ptr + ranks[:, None] * d_in + ks[None, :], mask=ks[None, :] < d_in, other=0.0,
                         cache_modifier=".cg")
            acc = _mma(ga, w_t, acc, F32_DOT_PRECISION, SPLIT_ACC)
        tl.store(dta_ptr + ranks[:, None] * d_out + rows[None, :], acc.to(dta_ptr.dtype.element_ty),
                 mask=(ranks[:, None] < rank) & (rows[None, :] < d_out))


@triton.jit
def _condlora_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, a_ptr, b_ptr, u_ptr, dx_ptr, dta_ptr, dtb_ptr, db_ptr,
    sv_ptr, part_a_ptr, part_b_ptr, part_db_ptr, grad_a_ptr, grad_b_ptr, flags_ptr, seed_ptr,
    n_rows, d_in, d_out, rank, num_slots,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_wn, stride_wk, stride_dxm, stride_dxk,
    scaling, keep_scale, drop_threshold, num_programs,
    MODE_PAPER: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DTHETA: tl.constexpr, NEED_DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    RED_BLOCK: tl.constexpr, DT_BLOCK: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, F32_DOT_PRECISION: tl.constexpr, SPLIT_ACC: tl.constexpr,
    FLAG_BLOCK: tl.constexpr,
):
    """Persistent backward: V heads one group ahead of their DX tiles; then RED tiles; then DTHETA tiles.
    flags: [0] finished programs, [1] finished partial-sum tiles, [2] finished RED tiles, [3 + m] V(m) done,
    then the turn counters of the shared slots: one per slot for V, one per (slot, column block) for DX."""
    HAS_DX_TILES: tl.constexpr = NEED_DX or NEED_DTHETA
    HAS_RED: tl.constexpr = NEED_DTHETA or NEED_DBIAS
    num_m = tl.cdiv(n_rows, BLOCK_M)
    num_k = tl.cdiv(d_in, BLOCK_N)
    num_cols = num_k if HAS_DX_TILES else 0
    num_group_tiles = (tl.cdiv(num_m, GROUP_M) + 1) * GROUP_M + num_m * num_cols
    num_red_a = tl.cdiv(d_in, RED_BLOCK) if NEED_DTHETA else 0
    num_red = num_red_a + tl.cdiv(d_out, RED_BLOCK) if HAS_RED else 0
    num_dtheta = 0
    if NEED_DTHETA:
        num_dtheta = tl.cdiv(d_in, DT_BLOCK) if MODE_PAPER else tl.cdiv(d_in, DT_BLOCK) + tl.cdiv(d_out, DT_BLOCK)
    # tiles that write partial sums: every V tile, and every DX tile when dA is needed
    num_partial_tiles = num_m + num_m * num_k if NEED_DTHETA else num_m
    num_tiles = num_group_tiles + num_red + num_dtheta
    partials_done_ptr = flags_ptr + 1
    red_done_ptr = flags_ptr + 2
    v_ready_ptr = flags_ptr + 3
    v_ticket_ptr = flags_ptr + 3 + num_m
    dx_ticket_ptr = v_ticket_ptr + num_slots
    seed_lo = 0
    seed_hi = 0
    if HAS_DROPOUT:
        seed_lo, seed_hi = _load_seed(seed_ptr)

    for t in range(tl.program_id(0), num_tiles, num_programs):
        if t < num_group_tiles:
            kind, m, k = _lookahead_tile(t, num_m, num_cols, GROUP_M)
            if kind == 0:
                _bwd_v_tile(dy_ptr, b_ptr, u_ptr, sv_ptr, part_b_ptr, part_db_ptr, v_ticket_ptr, m, num_slots, num_m,
                            n_rows, d_out, rank, stride_dym, stride_dyn, scaling, NEED_DTHETA, NEED_DBIAS,
                            BLOCK_M, BLOCK_K, R_PAD, DOT_PRECISION, SPLIT_ACC)
                tl.debug_barrier()
                tl.atomic_add(v_ready_ptr + m, 1, sem="release")
                tl.atomic_add(partials_done_ptr, 1, sem="release")
            elif kind == 1:
                if HAS_DX_TILES:
                    _bwd_dx_tile(dy_ptr, x_ptr, w_ptr, a_ptr, sv_ptr, dx_ptr, part_a_ptr, v_ready_ptr, dx_ticket_ptr,
                                 m, k, num_slots, num_m, num_k, n_rows, d_in, d_out, rank,
                                 stride_dym, stride_dyn, stride_xm, stride_xk, stride_wn, stride_wk,
                                 stride_dxm, stride_dxk, seed_lo, seed_hi, drop_threshold, keep_scale,
                                 NEED_DX, NEED_DTHETA, HAS_DROPOUT, BLOCK_M, BLOCK_N, BLOCK_K, R_PAD, DOT_PRECISION,
                                 SPLIT_ACC)
                    if NEED_DTHETA:
                        _signal(partials_done_ptr)
        elif t < num_group_tiles + num_red:
            if HAS_RED:
                _wait_at_least(partials_done_ptr, num_partial_tiles)
                r = t - num_group_tiles
                if r < num_red_a:
                    if NEED_DTHETA:
                        _bwd_reduce_a(part_a_ptr, grad_a_ptr, r, num_slots, d_in, RED_BLOCK, R_PAD)
                else:
                    _bwd_reduce_b(part_b_ptr, part_db_ptr, grad_b_ptr, db_ptr, r - num_red_a, num_slots, d_out,
                                  NEED_DTHETA, NEED_DBIAS, RED_BLOCK, R_PAD)
                _signal(red_done_ptr)
        else:
            if NEED_DTHETA:
                _wait_at_least(red_done_ptr, num_red)
                _bwd_dtheta_tile(w_ptr, grad_a_ptr, grad_b_ptr, dta_ptr, dtb_ptr, t - num_group_tiles - num_red,
                                 d_in, d_out, rank, stride_wn, stride_wk, MODE_PAPER, DT_BLOCK, BLOCK_K, R_PAD,
                                 F32_DOT_PRECISION, SPLIT_ACC)
    _exit_and_reset_flags(flags_ptr, 3 + num_m + num_slots * (1 + num_k), num_programs, FLAG_BLOCK)


# ==================================================================================================
# launchers
# ==================================================================================================

FLAG_BLOCK = 128


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _r_pad(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def _num_programs(device: torch.device, num_tiles: int) -> int:
    """One program per SM at most, so that all are resident at once (the flags rely on it); 1 when
    interpreting, where programs run one after another."""
    if _interpreting() or device.type != "cuda":
        return 1
    return max(1, min(num_tiles, torch.cuda.get_device_properties(device).multi_processor_count))


MAX_SLOTS_OVERRIDE: Optional[int] = None  # tests set it to make row blocks share slots


def _num_slots(n_rows: int, num_m: int, d_in: int, d_out: int, r_pad: int, elem_size: int) -> int:
    """Partial-sum slots of the backward: one per row block (each written once, no turns) while the
    float32 workspace stays within the size of one activation gradient (N * max(d_in, d_out) elements
    of the input dtype, 32 MiB at least); fewer, shared in turns, beyond that."""
    per_slot = r_pad * (d_in + d_out + 1) * 4
    budget = max(32 << 20, n_rows * max(d_in, d_out) * elem_size)
    slots = max(1, min(num_m, budget // per_slot))
    return min(slots, MAX_SLOTS_OVERRIDE) if MAX_SLOTS_OVERRIDE else slots


def _dot_precisions(dtype: torch.dtype) -> tuple[str, str]:
    """(precision of dots on input-dtype operands, of dots on float32 accumulators): tf32 only where
    torch allows it for float32 matmuls."""
    tf32_ok = torch.backends.cuda.matmul.allow_tf32
    input_precision = "tf32" if (dtype != torch.float32 or tf32_ok) else "ieee"
    f32_precision = "tf32" if (dtype in (torch.float16, torch.bfloat16) or tf32_ok) else "ieee"
    return input_precision, f32_precision


# Tuning hook for kernel development (benchmarks/triton_explore.py): when set, these dicts replace the
# configs chosen below. Keys: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages.
FWD_CONFIG_OVERRIDE: Optional[dict] = None
BWD_CONFIG_OVERRIDE: Optional[dict] = None
INTERPRETER_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)


def _fwd_config(n_rows: int, d_out: int, r_pad: int, dtype: torch.dtype) -> dict:
    """Output tile of the forward (Y tiles). The 128 x 256 x 64 tile of the Hopper matmul tutorials for
    large problems (254 registers, no spills on sm_90: benchmarks/compile_check.py); 128 x 128 for
    float32, large ranks and problems too small to fill the GPU with 128 x 256 tiles."""
    if _interpreting():
        return INTERPRETER_CONFIG
    if FWD_CONFIG_OVERRIDE is not None:
        return FWD_CONFIG_OVERRIDE
    if dtype == torch.float32:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    if r_pad > 64 or n_rows * d_out < 132 * 128 * 256 * 2:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def _bwd_config(n_rows: int, d_in: int, r_pad: int, dtype: torch.dtype, has_dropout: bool) -> dict:
    """Output tile of the backward (DX tiles). A dropout epilogue holds a second float32 tile in
    registers, which spills at 128 x 256: it takes 128 x 128."""
    if _interpreting():
        return INTERPRETER_CONFIG
    if BWD_CONFIG_OVERRIDE is not None:
        return BWD_CONFIG_OVERRIDE
    if dtype == torch.float32:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    if has_dropout or r_pad > 64 or n_rows * d_in < 132 * 128 * 256 * 2:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def _flags(n: int, device) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int32, device=device)


def _seed_args(seed: Optional[torch.Tensor], dropout_p: float, dummy: torch.Tensor):
    """(seed tensor, keep scale, 16-bit threshold) for the kernels; a placeholder seed without dropout."""
    if dropout_p > 0.0:
        return seed, reference.dropout_keep_scale(dropout_p), reference.dropout_threshold(dropout_p)
    return dummy, 1.0, 0


def _schedule_tiles(num_m: int, num_cols: int, group_m: int) -> int:
    """Tiles of the lookahead schedule H(0) | H(1) O(0) | ... | H(G) O(G-1) (see _lookahead_tile)."""
    return (triton.cdiv(num_m, group_m) + 1) * group_m + num_m * num_cols


def condlora_forward_launch(x2d, weight, bias, theta_a, theta_b, scaling: float, dropout_p: float,
                            seed: Optional[torch.Tensor], paper_mode: bool):
    """Allocate y, u, A, B and run the persistent forward kernel. Returns (y, u, lora_a, lora_b)."""
    n_rows, d_in = x2d.shape
    d_out = weight.shape[0]
    rank = theta_b.shape[0]
    r_pad = _r_pad(rank)
    device, dtype = x2d.device, x2d.dtype
    y = torch.empty((n_rows, d_out), device=device, dtype=dtype)
    u = torch.empty((n_rows, rank), device=device, dtype=dtype)
    lora_a = torch.empty((rank, d_in), device=device, dtype=dtype)
    lora_b = torch.empty((d_out, rank), device=device, dtype=dtype)
    theta_a = theta_a.contiguous()
    theta_b = theta_b.contiguous()
    cfg = _fwd_config(n_rows, d_out, r_pad, dtype)
    gen_block = 32 if _interpreting() else 64
    num_m = triton.cdiv(n_rows, cfg["BLOCK_M"])
    num_gen = triton.cdiv(d_out, gen_block) + (0 if paper_mode else triton.cdiv(d_in, gen_block))
    num_tiles = num_gen + _schedule_tiles(num_m, triton.cdiv(d_out, cfg["BLOCK_N"]), cfg["GROUP_M"])
    num_programs = _num_programs(device, num_tiles)
    flags = _flags(2 + num_m, device)
    seed_t, keep_scale, threshold = _seed_args(seed, dropout_p, flags)
    dot_precision, _ = _dot_precisions(dtype)
    kernel = torch.library.wrap_triton(_condlora_fwd_kernel)
    kernel[(num_programs,)](
        x2d, weight, bias if bias is not None else y, theta_a, theta_b, y, u, lora_a, lora_b, flags, seed_t,
        n_rows, d_in, d_out, rank,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), theta_a.stride(0), theta_b.stride(0),
        y.stride(0), y.stride(1),
        float(scaling), keep_scale, threshold, num_programs,
        MODE_PAPER=paper_mode, HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        GEN_BLOCK=gen_block, R_PAD=r_pad, DOT_PRECISION=dot_precision, SPLIT_ACC=dtype == torch.float32,
        FLAG_BLOCK=FLAG_BLOCK, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y, u, lora_a, lora_b


def condlora_backward_launch(grad_y, x2d, weight, lora_a, lora_b, u, scaling: float, dropout_p: float,
                             seed: Optional[torch.Tensor], paper_mode: bool, need_dx: bool, need_dtheta: bool,
                             need_dbias: bool):
    """Allocate gradients and workspaces and run the persistent backward kernel.
    Returns (dx, dtheta_a, dtheta_b, dbias), empty tensors for those not needed."""
    n_rows, d_in = x2d.shape
    d_out, rank = lora_b.shape
    r_pad = _r_pad(rank)
    device, dtype = x2d.device, x2d.dtype

    def output(shape, needed):  # a distinct empty tensor when not needed: op outputs may not alias
        return torch.empty(shape if needed else (0,), device=device, dtype=dtype)

    dx = output((n_rows, d_in), need_dx)
    dta = output(reference.theta_a_shape(rank, d_out, d_in, "paper" if paper_mode else "general"), need_dtheta)
    dtb = output((rank, d_in), need_dtheta)
    db = output((d_out,), need_dbias)
    if n_rows == 0 and (need_dtheta or need_dbias):  # nothing to reduce over: the sums are zero
        dta.zero_(), dtb.zero_(), db.zero_()
        return dx, dta, dtb, db
    if not (need_dx or need_dtheta or need_dbias):
        return dx, dta, dtb, db

    cfg = _bwd_config(n_rows, d_in, r_pad, dtype, dropout_p > 0.0)
    num_m = triton.cdiv(n_rows, cfg["BLOCK_M"])
    num_k = triton.cdiv(d_in, cfg["BLOCK_N"])
    num_slots = _num_slots(n_rows, num_m, d_in, d_out, r_pad, x2d.element_size())
    # the kernel's workspace offsets are int32: slots * r_pad * d stays far below 2^31 by the budget above
    assert num_slots * r_pad * max(d_in, d_out) < 2**31, "partial-sum workspace too large for int32 offsets"
    acc = dict(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    # workspaces: s v (input dtype), float32 partial sums and the reduced dA, dB. An argument that is not
    # needed gets the flags tensor as a placeholder: its constexpr switch keeps the kernel from touching it.
    flags = _flags(3 + num_m + num_slots * (1 + num_k), device)
    sv = torch.empty((n_rows, r_pad), device=device, dtype=dtype)
    part_a = torch.empty((num_slots, r_pad, d_in), **acc) if need_dtheta else flags
    part_b = torch.empty((num_slots, d_out, r_pad), **acc) if need_dtheta else flags
    part_db = torch.empty((num_slots, d_out), **acc) if need_dbias else flags
    grad_a = torch.empty((r_pad, d_in), **acc) if need_dtheta else flags
    grad_b = torch.empty((d_out, r_pad), **acc) if need_dtheta else flags
    red_block, dt_block = (32, 32) if _interpreting() else (64, 64)
    num_tiles = _schedule_tiles(num_m, num_k if (need_dx or need_dtheta) else 0, cfg["GROUP_M"])
    if need_dtheta or need_dbias:
        num_tiles += (triton.cdiv(d_in, red_block) if need_dtheta else 0) + triton.cdiv(d_out, red_block)
    if need_dtheta:
        num_tiles += triton.cdiv(d_in, dt_block) + (0 if paper_mode else triton.cdiv(d_out, dt_block))
    num_programs = _num_programs(device, num_tiles)
    seed_t, keep_scale, threshold = _seed_args(seed, dropout_p, flags)
    dot_precision, f32_precision = _dot_precisions(dtype)
    kernel = torch.library.wrap_triton(_condlora_bwd_kernel)
    kernel[(num_programs,)](
        grad_y, x2d, weight, lora_a, lora_b, u, dx, dta, dtb, db,
        sv, part_a, part_b, part_db, grad_a, grad_b, flags, seed_t,
        n_rows, d_in, d_out, rank, num_slots,
        grad_y.stride(0), grad_y.stride(1), x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
        dx.stride(0) if need_dx else 0, dx.stride(1) if need_dx else 0,
        float(scaling), keep_scale, threshold, num_programs,
        MODE_PAPER=paper_mode, HAS_DROPOUT=dropout_p > 0.0,
        NEED_DX=need_dx, NEED_DTHETA=need_dtheta, NEED_DBIAS=need_dbias,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        RED_BLOCK=red_block, DT_BLOCK=dt_block, R_PAD=r_pad,
        DOT_PRECISION=dot_precision, F32_DOT_PRECISION=f32_precision, SPLIT_ACC=dtype == torch.float32,
        FLAG_BLOCK=FLAG_BLOCK, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return dx, dta, dtb, db


# ==================================================================================================
# torch.library registration: opaque to autograd (the Function in ops/ drives them), traced by
# torch.compile through wrap_triton
# ==================================================================================================


@torch.library.triton_op("condlora_triton::forward", mutates_args=())
def forward_op(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], theta_a: torch.Tensor,
               theta_b: torch.Tensor, scaling: float, dropout_p: float, seed: Optional[torch.Tensor],
               paper_mode: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, u, lora_a, lora_b) of the CondLoRA forward, in one launch."""
    return condlora_forward_launch(x2d, weight, bias, theta_a, theta_b, scaling, dropout_p, seed, paper_mode)


@torch.library.triton_op("condlora_triton::backward", mutates_args=())
def backward_op(grad_y: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                lora_b: torch.Tensor, u: torch.Tensor, scaling: float, dropout_p: float, seed: Optional[torch.Tensor],
                paper_mode: bool, need_dx: bool, need_dtheta: bool,
                need_dbias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dtheta_a, dtheta_b, dbias) of the CondLoRA backward, in one launch (empty where not needed)."""
    return condlora_backward_launch(grad_y, x2d, weight, lora_a.contiguous(), lora_b.contiguous(), u.contiguous(),
                                    scaling, dropout_p, seed, paper_mode, need_dx, need_dtheta, need_dbias)


# ==================================================================================================
# the backend object used by ops/condlora_linear.py
# ==================================================================================================

GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# the interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584): no bf16 there
INTERPRETER_DTYPES = (torch.float16, torch.float32, torch.float64)


class TritonBackend:
    @staticmethod
    def unavailable_reason(x: torch.Tensor) -> Optional[str]:
        if x.device.type == "cuda":
            if x.dtype not in GPU_DTYPES:
                return f"the Triton kernels take float16, bfloat16 or float32 on the GPU, not {x.dtype}"
            major, minor = torch.cuda.get_device_capability(x.device)
            if major < 8:
                return f"the Triton kernels need compute capability 8.0 or newer, {x.device} has {major}.{minor}"
            return None
        if x.device.type == "cpu" and _interpreting():
            if x.dtype not in INTERPRETER_DTYPES:
                return f"under TRITON_INTERPRET the Triton kernels take float16, float32 or float64, not {x.dtype}"
            return None
        return f"the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {x.device.type}"

    @staticmethod
    def forward(x2d, weight, bias, theta_a, theta_b, scaling, dropout_p, seed, mode):
        y, u, lora_a, lora_b = torch.ops.condlora_triton.forward(x2d, weight, bias, theta_a, theta_b, scaling,
                                                                 dropout_p, seed, mode == "paper")
        return reference.ForwardOutputs(y, u, lora_a, lora_b)

    @staticmethod
    def backward(grad_y, x2d, weight, theta_a, theta_b, u, lora_a, lora_b, scaling, dropout_p, seed, mode, needs):
        need_x, need_ta, need_tb, need_b = needs
        dx, dta, dtb, db = torch.ops.condlora_triton.backward(grad_y, x2d, weight, lora_a, lora_b, u, scaling,
                                                              dropout_p, seed, mode == "paper", need_x,
                                                              need_ta or need_tb, need_b)
        return reference.BackwardOutputs(dx if need_x else None, dta if need_ta else None,
                                         dtb if need_tb else None, db if need_b else None)
