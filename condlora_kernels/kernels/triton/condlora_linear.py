"""Fused Triton kernels for CondLoRA: the whole forward in one launch, the whole backward in one launch.

Contents, top to bottom: jit helpers (dropout mask, dependency flags, tile schedule), the forward
kernel, the backward kernel, the launchers (sizes, configs, workspaces), the torch.library
registration (`triton_op` + `wrap_triton`, so torch.compile traces them), and `TritonBackend`, which
the autograd Function in ops/condlora_linear.py calls.

Notation: N tokens (rows of x), d_in, d_out, rank r (padded to R_PAD >= 16 for tl.dot), s = alpha / r,
x_hat = dropout(x), A = lora_a (r, d_in), B = lora_b (d_out, r), u = x_hat A^T (N, r).

Design: one persistent launch per direction, with a grid of at most one program per SM, all resident
at once. A tile that needs another's result spins on a flag in global memory (acquire) that the
producer sets after its stores (barrier, then release); every wait points to work that no waiting
program stands in front of, so the launch cannot deadlock. Under TRITON_INTERPRET programs run one
after another, so P = 1 there and each program does its phases in turn.

Forward (y = x W0^T + b + s u B^T): a list of tiles in which each depends only on earlier ones; program
p takes tiles p, p + P, p + 2P, ...
    GEN      B = W0 theta_b^T row blocks (and A^T = W0 theta_a^T rows in paper mode);
             in general mode also A^T = W0^T theta_a^T column blocks.            reads W0 once
    U(m)     u[m] = x_hat[m] A^T, stored for the backward; waits for every GEN tile.
    Y(m, n)  the frozen GEMM x[m] W0[n]^T (TMA main loop where the tensors allow); the epilogue waits for
             U(m), then adds (s u[m]) B[n]^T as one more MMA (K = R_PAD) into the same accumulator, + bias.
The Y tiles come in groups of GROUP_M row blocks (grouped order keeps the tiles a wave reads in L2);
the U tiles of group g + 1 are listed before the Y tiles of group g, so they run a group ahead. The
rank-r work thus happens once per row block (U) and once per weight row block (GEN), not once per
output tile.

Backward, chain rule (DESIGN.md §2):  v = dy B;  dx = dy W0 + s (v A) * M/(1-p);  dA = s v^T x_hat;
dB = s dy^T u;  dtheta_b = dB^T W0;  dtheta_a = dA W0 (paper) | dA W0^T (general);  db = sum_rows dy.
Roles instead of one list: a few *helper* programs do the rank-r work row block by row block, the
other *worker* programs run the input-gradient GEMM in a flattened loop, then all share the tail.
    helper, row block m   one pass over dy[m]: v[m] = dy[m] B (stored as s v[m] and published at once),
                          the partial sums s dy[m]^T u[m] (of dB) and sum_rows dy[m] (of db); then one
                          pass over x[m]: the partial sum (s v[m])^T x_hat[m] (of dA). A helper starts
                          row block m only while within LOOKAHEAD_GROUPS groups of the workers.
    worker, DX(m, k)      dy[m] W0[:, k] (TMA main loop where the tensors allow); the epilogue waits for
                          v[m] and adds (s v[m]) A[:, k] times the mask.
    all, RED              sums the S slots in a fixed order into dA, dB (float32) and db.
    all, DTHETA           dtheta = [dA; dB^T] W0 (paper) or dA W0^T, dB^T W0 (general).
Partial sums go to S float32 slots; when memory allows S = the number of row blocks and every slot is
written once. With fewer slots, blocks m, m + S, ... take turns on a slot in order of m. Either way each
sum is formed in an order that does not depend on scheduling: same inputs, bitwise the same gradients.
(Why the two directions differ: benchmarks/NOTES.md, versions v3 to v5.)
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from condlora_kernels import reference
from condlora_kernels.kernels.triton import autotune

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
def _mma(a, b, acc, zero, DOT_PRECISION: tl.constexpr, SPLIT_ACC: tl.constexpr):
    """acc + a @ b. For float32 data (SPLIT_ACC) each BLOCK_K slice is summed on its own and then
    added: Triton's IEEE float32 dot accumulates serially over K, and two levels keep its rounding
    error near cuBLAS's instead of growing with all of K. `zero` is a runtime 0.0 (a kernel argument):
    with a constant zero, Triton folds add(dot(a, b, 0), acc) back into dot(a, b, acc)."""
    if SPLIT_ACC:
        # (zero is cast: torch.compile passes Python floats to Triton as float64)
        return acc + tl.dot(a, b, (tl.zeros_like(acc) + zero).to(acc.dtype), input_precision=DOT_PRECISION)
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
def _grouped_tile(t, num_row_blocks, num_cols, GROUP_M: tl.constexpr):
    """(row block, column block) of output tile t in grouped order: GROUP_M row blocks at a time, row
    block fastest, so that the tiles one wave computes share x and W0 tiles in L2."""
    group_tiles = GROUP_M * num_cols
    first_m = (t // group_tiles) * GROUP_M
    rows_in_group = tl.minimum(num_row_blocks - first_m, GROUP_M)
    local = t % group_tiles
    return first_m + local % rows_in_group, local // rows_in_group


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


@triton.jit
def _store_tile(desc, ptr, acc, m, n, rows, cols, n_rows, n_cols, stride_r, stride_c,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """Store the output tile (m, n): through its tensor descriptor (clipped at the edges) or by pointers."""
    if USE_TMA:
        desc.store([m * BLOCK_M, n * BLOCK_N], acc.to(desc.dtype))
    else:
        tl.store(ptr + rows[:, None].to(tl.int64) * stride_r + cols[None, :] * stride_c, acc.to(ptr.dtype.element_ty),
                 mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


# ==================================================================================================
# forward kernel
# ==================================================================================================


@triton.jit
def _fwd_gen_rows(w_ptr, ta_ptr, tb_ptr, a_ptr, b_ptr, tile, d_in, d_out, rank,
                  stride_wn, stride_wk, stride_ta, stride_tb, zero,
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
        acc_b = _mma(w, tb_t, acc_b, zero, DOT_PRECISION, SPLIT_ACC)
        if MODE_PAPER:
            ta_t = tl.load(ta_ptr + ranks[None, :] * stride_ta + ks[:, None], mask=theta_mask, other=0.0)
            acc_a = _mma(w, ta_t, acc_a, zero, DOT_PRECISION, SPLIT_ACC)
    out_mask = (rows[:, None] < d_out) & (ranks[None, :] < rank)
    tl.store(b_ptr + rows[:, None] * rank + ranks[None, :], acc_b.to(b_ptr.dtype.element_ty), mask=out_mask)
    if MODE_PAPER:  # square W0: rows of W0 index the d_in columns of A
        tl.store(a_ptr + ranks[None, :] * d_in + rows[:, None], acc_a.to(a_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _fwd_gen_cols(w_ptr, ta_ptr, a_ptr, tile, d_in, d_out, rank, stride_wn, stride_wk, stride_ta, zero,
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
        acc = _mma(tl.trans(w), ta_t, acc, zero, DOT_PRECISION, SPLIT_ACC)
    tl.store(a_ptr + ranks[None, :] * d_in + cols[:, None], acc.to(a_ptr.dtype.element_ty),
             mask=(cols[:, None] < d_in) & (ranks[None, :] < rank))


@triton.jit
def _fwd_u_tile(x_ptr, a_ptr, u_ptr, m, n_rows, d_in, rank, stride_xm, stride_xk,
                seed_lo, seed_hi, drop_threshold, keep_scale, zero,
                HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_ACC: tl.constexpr):
    """u[rows] = x_hat[rows] A^T, stored in x's dtype (the backward and the Y epilogues read it back).
    A helper streams its row block of x alone: wide chunks, deeply pipelined, keep enough bytes in
    flight for one SM to read fast."""
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=ACC)
    for k0 in tl.range(0, d_in, BLOCK_K, num_stages=STAGES):
        ks = k0 + offs_k
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=(rows[:, None] < n_rows) & (ks[None, :] < d_in),
                    other=0.0)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed_lo, seed_hi, rows, k0, d_in, drop_threshold, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x.to(ACC) * keep_scale, 0.0).to(x.dtype)
        # A was written in this launch by other programs: read through L2 (.cg), never a stale L1 line
        a_t = tl.load(a_ptr + ranks[None, :] * d_in + ks[:, None], mask=(ks[:, None] < d_in) & (ranks[None, :] < rank),
                      other=0.0, cache_modifier=".cg")
        acc = _mma(x, a_t, acc, zero, DOT_PRECISION, SPLIT_ACC)
    tl.store(u_ptr + rows[:, None].to(tl.int64) * rank + ranks[None, :], acc.to(u_ptr.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (ranks[None, :] < rank))


@triton.jit
def _fwd_y_tile(x_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, y_ptr, x_desc, w_desc, y_desc, u_ready_ptr, m, n,
                n_rows, d_in, d_out, rank, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                scaling, zero, HAS_BIAS: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                SPLIT_ACC: tl.constexpr):
    """y[m, n] = x[m] W0[n]^T + (s u[m]) B[n]^T + b[n]. With USE_TMA the main loop's tiles come through
    tensor descriptors (the copy engine, zero-filled past the edges) and y leaves through one."""
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if USE_TMA:
        for k0 in range(0, d_in, BLOCK_K):
            x = x_desc.load([m * BLOCK_M, k0])
            w = w_desc.load([n * BLOCK_N, k0])
            acc = _mma(x, w.T, acc, zero, DOT_PRECISION, SPLIT_ACC)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
        for k0 in range(0, d_in, BLOCK_K):
            x = tl.load(x_ptrs, mask=(rows[:, None] < n_rows) & (offs_k[None, :] < d_in - k0), other=0.0)
            w = tl.load(w_ptrs, mask=(cols[None, :] < d_out) & (offs_k[:, None] < d_in - k0), other=0.0)
            acc = _mma(x, w, acc, zero, DOT_PRECISION, SPLIT_ACC)
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
    _store_tile(y_desc, y_ptr, acc, m, n, rows, cols, n_rows, d_out, stride_ym, stride_yn, BLOCK_M, BLOCK_N, USE_TMA)


@triton.jit
def _condlora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, ta_ptr, tb_ptr, y_ptr, u_ptr, a_ptr, b_ptr, flags_ptr, seed_ptr,
    x_desc, w_desc, y_desc,
    n_rows, d_in, d_out, rank,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ta, stride_tb, stride_ym, stride_yn,
    scaling, keep_scale, drop_threshold, num_programs, zero,
    MODE_PAPER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    GEN_BLOCK: tl.constexpr, HELPER_BLOCK_K: tl.constexpr, HELPER_STAGES: tl.constexpr, R_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SPLIT_ACC: tl.constexpr, FLAG_BLOCK: tl.constexpr,
):
    """Persistent forward: GEN tiles, then U heads one group ahead of their Y tiles, all programs taking
    tiles in turn. flags: [0] finished programs, [1] finished GEN tiles, [2 + m] U(m) done.

    (Measured against a split into a few helper programs doing GEN/U and worker programs running a
    flattened GEMM loop: the helpers either fell behind or, running ahead, streamed x through L2 and
    slowed the workers' GEMM; spreading the heads over all programs, a group ahead, did better.
    benchmarks/NOTES.md, forward v3 and v4.)"""
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
                              stride_ta, stride_tb, zero, MODE_PAPER, GEN_BLOCK, BLOCK_K, R_PAD, DOT_PRECISION,
                              SPLIT_ACC)
            else:
                _fwd_gen_cols(w_ptr, ta_ptr, a_ptr, t - num_gen_rows, d_in, d_out, rank, stride_wn, stride_wk,
                              stride_ta, zero, GEN_BLOCK, BLOCK_K, R_PAD, DOT_PRECISION, SPLIT_ACC)
            _signal(gen_done_ptr)
        else:
            kind, m, n = _lookahead_tile(t - num_gen, num_m, num_n, GROUP_M)
            if kind == 0:
                _wait_at_least(gen_done_ptr, num_gen)
                _fwd_u_tile(x_ptr, a_ptr, u_ptr, m, n_rows, d_in, rank, stride_xm, stride_xk, seed_lo, seed_hi,
                            drop_threshold, keep_scale, zero, HAS_DROPOUT, BLOCK_M, HELPER_BLOCK_K, HELPER_STAGES,
                            R_PAD, DOT_PRECISION, SPLIT_ACC)
                _signal(u_ready_ptr + m)
            elif kind == 1:
                _fwd_y_tile(x_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, y_ptr, x_desc, w_desc, y_desc, u_ready_ptr, m, n,
                            n_rows, d_in, d_out, rank, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                            scaling, zero, HAS_BIAS, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_K, R_PAD, DOT_PRECISION,
                            SPLIT_ACC)
    _exit_and_reset_flags(flags_ptr, 2 + num_m, num_programs, FLAG_BLOCK)


# ==================================================================================================
# backward kernel
# ==================================================================================================


@triton.jit
def _bwd_row_block(dy_ptr, x_ptr, b_ptr, u_ptr, sv_ptr, part_a_ptr, part_b_ptr, part_db_ptr, ticket_ptr, v_ready_ptr,
                   m, num_slots, n_rows, d_in, d_out, rank, stride_dym, stride_dyn, stride_xm, stride_xk, scaling,
                   seed_lo, seed_hi, drop_threshold, keep_scale, zero,
                   NEED_DTHETA: tl.constexpr, NEED_DBIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, R_PAD: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, SPLIT_ACC: tl.constexpr):
    """All the rank-r work of row block m, on a helper program:
    one pass over dy[m]: v = dy[m] B, and the partial sums s dy[m]^T u[m] (of dB) and sum_rows dy[m] (of db);
    s v is stored and published at once (the DX tiles of row block m wait for it); then one pass over
    x[m]: the partial sum (s v)^T x_hat[m] (of dA). Partial sums go to slot m mod S, which blocks
    m - S, m - 2S, ... have filled before, in that order (a ticket per slot): deterministic sums."""
    ACC: tl.constexpr = tl.float64 if dy_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = rows < n_rows
    slot = m % num_slots
    turn = m // num_slots
    if NEED_DTHETA or NEED_DBIAS:
        _wait_at_least(ticket_ptr + slot, turn)
    if NEED_DTHETA:
        u = tl.load(u_ptr + rows[:, None].to(tl.int64) * rank + ranks[None, :],
                    mask=row_mask[:, None] & (ranks[None, :] < rank), other=0.0)
    dy_rows = dy_ptr + rows[:, None].to(tl.int64) * stride_dym
    v = tl.zeros((BLOCK_M, R_PAD), dtype=ACC)
    for c0 in tl.range(0, d_out, BLOCK_K, num_stages=STAGES):
        cs = c0 + offs_k
        dy = tl.load(dy_rows + cs[None, :] * stride_dyn, mask=row_mask[:, None] & (cs[None, :] < d_out), other=0.0)
        b = tl.load(b_ptr + cs[:, None] * rank + ranks[None, :], mask=(cs[:, None] < d_out) & (ranks[None, :] < rank),
                    other=0.0)
        v = _mma(dy, b, v, zero, DOT_PRECISION, SPLIT_ACC)
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
    # s v in the input dtype (v rounded first, as the reference rounds it)
    sv = (v.to(dy_ptr.dtype.element_ty).to(ACC) * scaling).to(sv_ptr.dtype.element_ty)
    tl.store(sv_ptr + rows[:, None].to(tl.int64) * R_PAD + ranks[None, :], sv, mask=row_mask[:, None])
    _signal(v_ready_ptr + m)
    if NEED_DTHETA:
        x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
        for k0 in tl.range(0, d_in, BLOCK_K, num_stages=STAGES):
            ks = k0 + offs_k
            x = tl.load(x_rows + ks[None, :] * stride_xk, mask=row_mask[:, None] & (ks[None, :] < d_in), other=0.0)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed_lo, seed_hi, rows, k0, d_in, drop_threshold, BLOCK_M, BLOCK_K)
                x = tl.where(keep, x.to(ACC) * keep_scale, 0.0).to(x.dtype)
            part = tl.dot(tl.trans(sv), x, input_precision=DOT_PRECISION)  # (R_PAD, BLOCK_K)
            p_ptrs = part_a_ptr + (slot * R_PAD + ranks[:, None]) * d_in + ks[None, :]
            if turn > 0:
                part += tl.load(p_ptrs, mask=ks[None, :] < d_in, other=0.0, cache_modifier=".cg")
            tl.store(p_ptrs, part, mask=ks[None, :] < d_in)
    if NEED_DTHETA or NEED_DBIAS:
        tl.debug_barrier()
        tl.atomic_xchg(ticket_ptr + slot, turn + 1, sem="release")


@triton.jit
def _bwd_dx_tile(dy_ptr, w_ptr, a_ptr, sv_ptr, dx_ptr, dy_desc, w_desc, dx_desc, v_ready_ptr, m, k,
                 n_rows, d_in, d_out, rank, stride_dym, stride_dyn, stride_wn, stride_wk, stride_dxm, stride_dxk,
                 seed_lo, seed_hi, drop_threshold, keep_scale, zero,
                 HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_ACC: tl.constexpr):
    """dx[m, k] = dy[m] W0[:, k] + ((s v[m]) A[:, k]) * M / (1 - p); the epilogue waits for row block m's v."""
    ACC: tl.constexpr = tl.float64 if dy_ptr.dtype.element_ty == tl.float64 else tl.float32
    rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = k * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of dx: the d_in axis
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if USE_TMA:  # the reduction runs over d_out
        for c0 in range(0, d_out, BLOCK_K):
            dy = dy_desc.load([m * BLOCK_M, c0])
            w = w_desc.load([c0, k * BLOCK_N])
            acc = _mma(dy, w, acc, zero, DOT_PRECISION, SPLIT_ACC)
    else:
        offs_c = tl.arange(0, BLOCK_K)
        dy_ptrs = dy_ptr + rows[:, None].to(tl.int64) * stride_dym + offs_c[None, :] * stride_dyn
        w_ptrs = w_ptr + offs_c[:, None].to(tl.int64) * stride_wn + cols[None, :] * stride_wk
        for c0 in range(0, d_out, BLOCK_K):
            dy = tl.load(dy_ptrs, mask=(rows[:, None] < n_rows) & (offs_c[None, :] < d_out - c0), other=0.0)
            w = tl.load(w_ptrs, mask=(offs_c[:, None] < d_out - c0) & (cols[None, :] < d_in), other=0.0)
            acc = _mma(dy, w, acc, zero, DOT_PRECISION, SPLIT_ACC)
            dy_ptrs += BLOCK_K * stride_dyn
            w_ptrs += BLOCK_K * stride_wn

    _wait_at_least(v_ready_ptr + m, 1)
    ranks = tl.arange(0, R_PAD)
    sv = tl.load(sv_ptr + rows[:, None].to(tl.int64) * R_PAD + ranks[None, :], mask=rows[:, None] < n_rows,
                 other=0.0, cache_modifier=".cg")
    a = tl.load(a_ptr + ranks[:, None] * d_in + cols[None, :], mask=(ranks[:, None] < rank) & (cols[None, :] < d_in),
                other=0.0)
    if HAS_DROPOUT:
        low_rank = tl.dot(sv, a, input_precision=DOT_PRECISION)
        keep = _dropout_keep(seed_lo, seed_hi, rows, k * BLOCK_N, d_in, drop_threshold, BLOCK_M, BLOCK_N)
        acc += tl.where(keep, low_rank * keep_scale, 0.0).to(ACC)  # keep_scale may come in as float64
    else:
        acc = tl.dot(sv, a, acc, input_precision=DOT_PRECISION)
    _store_tile(dx_desc, dx_ptr, acc, m, k, rows, cols, n_rows, d_in, stride_dxm, stride_dxk, BLOCK_M, BLOCK_N, USE_TMA)


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
                     stride_wn, stride_wk, zero, MODE_PAPER: tl.constexpr, DT_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
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
            acc_b = _mma(gb_t, w, acc_b, zero, F32_DOT_PRECISION, SPLIT_ACC)
            if MODE_PAPER:  # square: the rows of W0 are the d_in columns of dA
                ga = tl.load(grad_a_ptr + ranks[:, None] * d_in + ks[None, :], mask=ks[None, :] < d_in, other=0.0,
                             cache_modifier=".cg")
                acc_a = _mma(ga, w, acc_a, zero, F32_DOT_PRECISION, SPLIT_ACC)
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
            acc = _mma(ga, w_t, acc, zero, F32_DOT_PRECISION, SPLIT_ACC)
        tl.store(dta_ptr + ranks[:, None] * d_out + rows[None, :], acc.to(dta_ptr.dtype.element_ty),
                 mask=(ranks[:, None] < rank) & (rows[None, :] < d_out))


@triton.jit
def _condlora_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, a_ptr, b_ptr, u_ptr, dx_ptr, dta_ptr, dtb_ptr, db_ptr,
    sv_ptr, part_a_ptr, part_b_ptr, part_db_ptr, grad_a_ptr, grad_b_ptr, flags_ptr, seed_ptr,
    dy_desc, w_desc, dx_desc,
    n_rows, d_in, d_out, rank, num_slots,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_wn, stride_wk, stride_dxm, stride_dxk,
    scaling, keep_scale, drop_threshold, num_programs, num_helpers, lookahead, zero,
    MODE_PAPER: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DTHETA: tl.constexpr, NEED_DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    RED_BLOCK: tl.constexpr, DT_BLOCK: tl.constexpr, HELPER_BLOCK_K: tl.constexpr, HELPER_STAGES: tl.constexpr,
    R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, F32_DOT_PRECISION: tl.constexpr, SPLIT_ACC: tl.constexpr,
    FLATTEN: tl.constexpr, FLAG_BLOCK: tl.constexpr,
):
    """Persistent backward. Programs 0 .. num_helpers - 1 do the rank-r work of row blocks 0, 1, 2, ...
    (v, then the partial sums of dA, dB, db); the others run the DX tiles in a flattened loop; then
    every program takes its share of the RED tiles, then of the DTHETA tiles. With one program (the
    interpreter) it does all of it in turn.
    A helper starts a row block of group g only once the workers have finished the tiles of the groups
    before g - lookahead: helpers that run far ahead stream dy and x through L2 and evict the tiles the
    workers' waves share (measured: benchmarks/NOTES.md). The waits point to strictly earlier groups,
    so they cannot deadlock.
    flags: [0] finished programs, [1] finished row blocks, [2] finished RED tiles, [3] finished DX tiles,
    [4 + m] v of row block m stored, [4 + num_m + slot] whose turn it is to add into that slot."""
    HAS_RED: tl.constexpr = NEED_DTHETA or NEED_DBIAS
    pid = tl.program_id(0)
    num_m = tl.cdiv(n_rows, BLOCK_M)
    num_k = tl.cdiv(d_in, BLOCK_N)
    rows_done_ptr = flags_ptr + 1
    red_done_ptr = flags_ptr + 2
    dx_done_ptr = flags_ptr + 3
    v_ready_ptr = flags_ptr + 4
    ticket_ptr = flags_ptr + 4 + num_m
    seed_lo = 0
    seed_hi = 0
    if HAS_DROPOUT:
        seed_lo, seed_hi = _load_seed(seed_ptr)

    single = num_programs == 1
    if pid < num_helpers:
        for m in range(pid, num_m, num_helpers):
            if NEED_DX and not single:  # stay within `lookahead` groups of the workers
                _wait_at_least(dx_done_ptr, (m // GROUP_M - lookahead) * GROUP_M * num_k)
            _bwd_row_block(dy_ptr, x_ptr, b_ptr, u_ptr, sv_ptr, part_a_ptr, part_b_ptr, part_db_ptr, ticket_ptr,
                           v_ready_ptr, m, num_slots, n_rows, d_in, d_out, rank, stride_dym, stride_dyn, stride_xm,
                           stride_xk, scaling, seed_lo, seed_hi, drop_threshold, keep_scale, zero, NEED_DTHETA,
                           NEED_DBIAS, HAS_DROPOUT, BLOCK_M, HELPER_BLOCK_K, HELPER_STAGES, R_PAD, DOT_PRECISION,
                           SPLIT_ACC)
            _signal(rows_done_ptr)
    if NEED_DX:
        if (pid >= num_helpers) | single:
            worker = tl.where(single, 0, pid - num_helpers)
            num_workers = tl.where(single, 1, num_programs - num_helpers)
            for t in tl.range(worker, num_m * num_k, num_workers, flatten=FLATTEN):
                m, k = _grouped_tile(t, num_m, num_k, GROUP_M)
                _bwd_dx_tile(dy_ptr, w_ptr, a_ptr, sv_ptr, dx_ptr, dy_desc, w_desc, dx_desc, v_ready_ptr, m, k,
                             n_rows, d_in, d_out, rank, stride_dym, stride_dyn, stride_wn, stride_wk, stride_dxm,
                             stride_dxk, seed_lo, seed_hi, drop_threshold, keep_scale, zero, HAS_DROPOUT, USE_TMA,
                             BLOCK_M, BLOCK_N, BLOCK_K, R_PAD, DOT_PRECISION, SPLIT_ACC)
                tl.atomic_add(dx_done_ptr, 1, sem="relaxed")  # progress only: no data is published
    if HAS_RED:
        num_red_a = tl.cdiv(d_in, RED_BLOCK) if NEED_DTHETA else 0
        num_red = num_red_a + tl.cdiv(d_out, RED_BLOCK)
        num_dtheta = 0
        if NEED_DTHETA:
            num_dtheta = tl.cdiv(d_in, DT_BLOCK) if MODE_PAPER else tl.cdiv(d_in, DT_BLOCK) + tl.cdiv(d_out, DT_BLOCK)
        for t in range(pid, num_red + num_dtheta, num_programs):
            if t < num_red:
                _wait_at_least(rows_done_ptr, num_m)
                if t < num_red_a:
                    if NEED_DTHETA:
                        _bwd_reduce_a(part_a_ptr, grad_a_ptr, t, num_slots, d_in, RED_BLOCK, R_PAD)
                else:
                    _bwd_reduce_b(part_b_ptr, part_db_ptr, grad_b_ptr, db_ptr, t - num_red_a, num_slots, d_out,
                                  NEED_DTHETA, NEED_DBIAS, RED_BLOCK, R_PAD)
                _signal(red_done_ptr)
            else:
                if NEED_DTHETA:
                    _wait_at_least(red_done_ptr, num_red)
                    _bwd_dtheta_tile(w_ptr, grad_a_ptr, grad_b_ptr, dta_ptr, dtb_ptr, t - num_red, d_in, d_out, rank,
                                     stride_wn, stride_wk, zero, MODE_PAPER, DT_BLOCK, BLOCK_K, R_PAD,
                                     F32_DOT_PRECISION, SPLIT_ACC)
    _exit_and_reset_flags(flags_ptr, 4 + num_m + num_slots, num_programs, FLAG_BLOCK)


# ==================================================================================================
# launchers
# ==================================================================================================

FLAG_BLOCK = 128
FLATTEN = True  # flatten the backward workers' persistent loop (tutorial 09)
LOOKAHEAD_GROUPS = 2  # how many groups of row blocks the backward's helpers may run ahead of its workers


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _r_pad(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_programs(device: torch.device, work_items: int) -> int:
    """One program per SM at most, so that all are resident at once (the flags rely on it); 1 when
    interpreting, where programs run one after another."""
    if _interpreting() or device.type != "cuda":
        return 1
    return max(1, min(work_items, _sm_count(device.index if device.index is not None else torch.cuda.current_device())))


# Rough per-SM rates that size the backward's helper group: a helper streams rows of x and dy at about
# HELPER_BYTES_PER_S (about 30 GB/s measured on an H100: its loop is bound by latency, not by HBM), a
# worker multiplies at about WORKER_FLOPS_PER_S (bf16). With them _num_helpers picks the helper counts
# that measured best on the H100 (16 at d = 4096, 8 at d = 8192, 11-16 for 4096 -> 11008; NOTES.md).
HELPER_BYTES_PER_S = 30e9
WORKER_FLOPS_PER_S = 5e12
HELPERS_OVERRIDE: Optional[int] = None  # tuning hook (benchmarks/triton_explore.py)


def _num_helpers(num_programs: int, helper_bytes: float, worker_flops: float, num_m: int, min_helpers: int,
                 scale: float = 1.0) -> int:
    """How many programs do the rank-r row work while the others multiply: enough that the helpers'
    share of the time matches their share of the work, with a margin of 1.5 so that they stay ahead,
    and at least `min_helpers` so the first group's rows are ready when the first output tiles are.
    `scale` multiplies that count (the autotuner's variants) within the same bounds: one helper at
    least, no more than the row blocks, and a quarter of the programs at most, so that workers remain
    for the DX tiles the helpers wait on."""
    if num_programs == 1:
        return 1
    if HELPERS_OVERRIDE is not None:
        return max(1, min(HELPERS_OVERRIDE, num_programs - 1))
    t_helper = helper_bytes / HELPER_BYTES_PER_S
    t_worker = worker_flops / WORKER_FLOPS_PER_S
    wanted = math.ceil(1.5 * num_programs * t_helper / max(t_helper + t_worker, 1e-30))
    most = min(num_m, num_programs // 4 if num_programs >= 8 else 1)
    helpers = max(1, min(max(wanted, min_helpers), most))
    return helpers if scale == 1.0 else max(1, min(round(helpers * scale), most))


def _tracing(t: torch.Tensor) -> bool:
    """True while torch.compile (or opcheck) traces the op: the tensors are fake or functional wrappers,
    not plain tensors, and have no memory that could be cached across calls."""
    return type(t) is not torch.Tensor or torch.compiler.is_compiling()


def _launchable(kernel, like: torch.Tensor):
    """The kernel itself in eager mode; wrapped for torch.compile while tracing. (Called outside a
    triton_op body, wrap_triton routes every launch through a higher-order op that keeps its constant
    arguments in a global table: slower, and it holds on to the tensors behind tensor descriptors.)"""
    return torch.library.wrap_triton(kernel) if _tracing(like) else kernel


def _tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether TMA tensor descriptors can address these 2-D tensors: a Hopper GPU or newer (or the
    interpreter), unit stride in the last dimension, 16-byte aligned rows and start (the caching
    allocator aligns every allocation to 512 bytes, so the start is aligned when the storage offset
    is). Not in float64 (the interpreter's gradcheck)."""
    device = tensors[0].device
    if not _interpreting() and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9):
        return False
    for t in tensors:
        size = t.element_size()
        if (t.dtype == torch.float64 or t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * size) % 16
                or (t.storage_offset() * size) % 16):
            return False
    return True


# Building the host-side tensor descriptors costs ~90 us of host time per launch (measured on the H100
# machine, benchmarks/NOTES.md); below this many multiply-adds the GEMM cannot hide it, and the pointer
# main loop, ~10% slower on the GPU, is the faster choice.
TMA_MIN_MACS = 2**35


def _use_tma(macs: int, *tensors: torch.Tensor) -> bool:
    """TMA main loops in eager mode, for problems large enough to hide the descriptors' host cost.
    Traced by torch.compile, a triton_op's host-side tensor descriptors keep the fake tensor they were
    built from and the compiled graph cannot run them (torch 2.11: "Cannot access data pointer of
    Tensor"), so traced graphs take the pointer main loop."""
    return macs >= TMA_MIN_MACS and not _tracing(tensors[0]) and _tma_ready(*tensors)


def _descriptor(t: torch.Tensor, block_shape):
    return TensorDescriptor.from_tensor(t, list(block_shape))


MAX_SLOTS_OVERRIDE: Optional[int] = None  # tests set it to make row blocks share slots


def _num_slots(n_rows: int, num_m: int, d_in: int, d_out: int, r_pad: int, elem_size: int, num_helpers: int) -> int:
    """Partial-sum slots of the backward: one per row block, each written once (no read-back, no turns:
    the helpers just store), while the float32 workspace stays within the size of one activation
    gradient (N * max(d_in, d_out) elements of the input dtype, 32 MiB at least); fewer, shared in
    turns, beyond that."""
    per_slot = r_pad * (d_in + d_out + 1) * 4
    budget = max(32 << 20, n_rows * max(d_in, d_out) * elem_size)
    slots = min(num_m, max(1, budget // per_slot))
    return max(1, min(slots, MAX_SLOTS_OVERRIDE) if MAX_SLOTS_OVERRIDE else slots)


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
    large problems (255 registers, no spills on sm_90 for r <= 16: benchmarks/compile_check.py); 128 x 128
    for float32 and for problems too small to fill the GPU with 128 x 256 tiles; two pipeline stages for
    ranks of 128 and more, whose rank-r operands take shared memory too."""
    if _interpreting():
        return INTERPRETER_CONFIG
    if FWD_CONFIG_OVERRIDE is not None:
        return FWD_CONFIG_OVERRIDE
    if r_pad >= 128:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=2)
    if dtype == torch.float32:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    if r_pad >= 64:  # its u and B operands take shared memory: Triton 3.6 needed 262 KiB at 128 x 256 x 3 stages
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=2)
    if n_rows * d_out < 132 * 128 * 256 * 2:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def _bwd_config(n_rows: int, d_in: int, r_pad: int, dtype: torch.dtype, has_dropout: bool) -> dict:
    """Output tile of the backward (DX tiles). A dropout epilogue holds a second float32 tile in
    registers, which spills heavily at 128 x 256: it takes 128 x 128. Ranks of 128 and more take
    64 x 128 x 32 tiles in two stages (shared memory)."""
    if _interpreting():
        return INTERPRETER_CONFIG
    if BWD_CONFIG_OVERRIDE is not None:
        return BWD_CONFIG_OVERRIDE
    if r_pad >= 128:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=2)
    if dtype == torch.float32:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    if r_pad >= 64:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=2)
    if has_dropout or n_rows * d_in < 132 * 128 * 256 * 2:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


_FLAG_WORKSPACES: dict = {}


def _helper_loop(dtype: torch.dtype, r_pad: int) -> dict:
    """Chunk width and pipeline depth of the streaming loops over rows of x and dy (U, V, the dA
    partials): 128 columns, 4 stages in flight, ~32 KiB each for bf16, so that one SM reading a row
    block alone keeps enough bytes in flight; 64 columns and 2 stages for float32 and ranks of 64 and
    more, whose operands need the shared memory."""
    if _interpreting():
        return dict(HELPER_BLOCK_K=32, HELPER_STAGES=1)
    if dtype == torch.float32 or r_pad >= 64:
        return dict(HELPER_BLOCK_K=64, HELPER_STAGES=2)
    return dict(HELPER_BLOCK_K=128, HELPER_STAGES=4)


_STAGE_LIMITS: dict = {}  # launch configuration -> the most pipeline stages that fit this GPU's shared memory


def _launch(kernel, grid, args, meta: dict, like: torch.Tensor, quiet: bool = False) -> None:
    """Launch, with one fallback: a configuration whose pipeline does not fit the GPU's shared memory
    (an A100 has 164 KiB, an H100 227 KiB; Triton versions lay buffers out differently) is retried with
    one stage fewer, and the limit is remembered. Said once, as a warning: it costs some speed (not
    while the autotuner races candidates, `quiet`: it times each as it runs)."""
    key = (kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), like.device,
           tuple(sorted((k, v) for k, v in meta.items() if k != "num_stages")))
    stages = min(meta["num_stages"], _STAGE_LIMITS.get(key, meta["num_stages"]))
    while True:
        try:
            _launchable(kernel, like)[grid](*args, **{**meta, "num_stages": stages})
            return
        except triton.runtime.errors.OutOfResources as exc:
            if stages <= 1 or _tracing(like):
                raise
            stages -= 1
            _STAGE_LIMITS[key] = stages
            if not quiet:
                warnings.warn(f"condlora_kernels: {key[0]} with {dict(key[2])} does not fit this GPU's shared "
                              f"memory ({exc}); using {stages} pipeline stage(s)", stacklevel=3)


def _flags(n: int, like: torch.Tensor) -> torch.Tensor:
    """n int32 dependency flags, zero on entry. In eager mode one buffer per (device, stream) is kept:
    every launch leaves its flags zeroed at exit (_exit_and_reset_flags), so the next launch on that
    stream finds them clean and no zero-fill launch is needed per call. Under torch.compile tracing a
    fresh zeroed tensor (a traced op)."""
    device = like.device
    if _tracing(like):
        return torch.zeros(n, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buf = _FLAG_WORKSPACES.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _FLAG_WORKSPACES[key] = buf
    return buf


def _seed_args(seed: Optional[torch.Tensor], dropout_p: float, dummy: torch.Tensor):
    """(seed tensor, keep scale, 16-bit threshold) for the kernels; a placeholder seed without dropout."""
    if dropout_p > 0.0:
        return seed, reference.dropout_keep_scale(dropout_p), reference.dropout_threshold(dropout_p)
    return dummy, 1.0, 0


def _tuning_fixed(*overrides: object) -> bool:
    """Whether the configuration is fixed for this launch: tuning is off (CONDLORA_AUTOTUNE=0, the
    interpreter) or a development hook forces it (benchmarks/triton_explore.py sweeps configs)."""
    return not autotune.enabled() or any(o is not None for o in overrides)


def condlora_forward_launch(x2d, weight, bias, theta_a, theta_b, scaling: float, dropout_p: float,
                            seed: Optional[torch.Tensor], paper_mode: bool):
    """Allocate y, u, A, B and run the persistent forward kernel, with the autotuned configuration
    (autotune.py) or the heuristic one. Returns (y, u, lora_a, lora_b)."""
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
    gen_block = 32 if _interpreting() else 64
    num_gen = triton.cdiv(d_out, gen_block) + (0 if paper_mode else triton.cdiv(d_in, gen_block))
    dot_precision, _ = _dot_precisions(dtype)
    use_tma = _use_tma(n_rows * d_in * d_out, x2d, weight, y) and n_rows > 0
    switches = dict(MODE_PAPER=paper_mode, HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0, USE_TMA=use_tma,
                    DOT_PRECISION=dot_precision)

    def run(cfg: dict, quiet: bool = False) -> None:
        """One launch with configuration `cfg`; it writes y, u, A and B completely."""
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        num_m = triton.cdiv(n_rows, bm)
        num_tiles = num_gen + (triton.cdiv(num_m, cfg["GROUP_M"]) + 1) * cfg["GROUP_M"] + num_m * triton.cdiv(d_out, bn)
        num_programs = _num_programs(device, num_tiles)
        flags = _flags(2 + num_m, x2d)
        seed_t, keep_scale, threshold = _seed_args(seed, dropout_p, flags)
        if use_tma:
            descs = (_descriptor(x2d, (bm, bk)), _descriptor(weight, (bn, bk)), _descriptor(y, (bm, bn)))
        else:  # placeholders: USE_TMA=False keeps the kernel from touching them
            descs = (x2d, weight, y)
        args = (x2d, weight, bias if bias is not None else y, theta_a, theta_b, y, u, lora_a, lora_b, flags, seed_t,
                *descs, n_rows, d_in, d_out, rank,
                x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), theta_a.stride(0), theta_b.stride(0),
                y.stride(0), y.stride(1),
                float(scaling), keep_scale, threshold, num_programs, 0.0)
        meta = dict(switches, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], GEN_BLOCK=gen_block,
                    R_PAD=r_pad, SPLIT_ACC=dtype == torch.float32, FLAG_BLOCK=FLAG_BLOCK,
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_helper_loop(dtype, r_pad))
        _launch(_condlora_fwd_kernel, (num_programs,), args, meta, x2d, quiet=quiet)

    heuristic = _fwd_config(n_rows, d_out, r_pad, dtype)
    if _tuning_fixed(FWD_CONFIG_OVERRIDE):
        run(heuristic)
    else:
        key = autotune.make_key("condlora_fwd", device, dtype, r_pad, d_in, d_out, n_rows, **switches)
        autotune.run_tuned(
            key, heuristic,
            lambda: autotune.forward_candidates(heuristic, dtype, r_pad, _helper_loop(dtype, r_pad),
                                                autotune.shared_memory_limit(device)),
            run, device_type=device.type, tracing=_tracing(x2d), n_rows=n_rows)
    return y, u, lora_a, lora_b


def condlora_backward_launch(grad_y, x2d, weight, lora_a, lora_b, u, scaling: float, dropout_p: float,
                             seed: Optional[torch.Tensor], paper_mode: bool, need_dx: bool, need_dtheta: bool,
                             need_dbias: bool):
    """Allocate gradients and workspaces and run the persistent backward kernel, with the autotuned
    configuration (autotune.py) or the heuristic one.
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

    has_dropout = dropout_p > 0.0
    # a helper reads dy and x once per row block; a dropout mask costs about one more pass, and the
    # rank-r dots and partial-sum stores grow with the rank
    helper_bytes = n_rows * (d_out + (d_in * (2 if has_dropout else 1) if need_dtheta else 0)) * x2d.element_size()
    helper_bytes *= max(1.0, r_pad / 32)
    worker_flops = 2.0 * n_rows * d_in * d_out if need_dx else 0.0
    red_block, dt_block = (32, 32) if _interpreting() else (64, 64)
    dot_precision, f32_precision = _dot_precisions(dtype)
    use_tma = need_dx and _use_tma(n_rows * d_in * d_out, grad_y, weight, dx)
    switches = dict(MODE_PAPER=paper_mode, HAS_DROPOUT=has_dropout, USE_TMA=use_tma, NEED_DX=need_dx,
                    NEED_DTHETA=need_dtheta, NEED_DBIAS=need_dbias, DOT_PRECISION=dot_precision,
                    F32_DOT_PRECISION=f32_precision)

    def schedule(cfg: dict) -> tuple[int, int, int]:
        """(row blocks, programs, helper programs) of a launch with configuration `cfg`."""
        num_m = triton.cdiv(n_rows, cfg["BLOCK_M"])
        num_programs = _num_programs(device, num_m * triton.cdiv(d_in, cfg["BLOCK_N"]) + 1 if need_dx else num_m)
        num_helpers = _num_helpers(num_programs, helper_bytes, worker_flops, num_m, min_helpers=8,
                                   scale=cfg.get("HELPER_SCALE", 1.0))
        return num_m, num_programs, num_helpers

    def run(cfg: dict, quiet: bool = False) -> None:
        """One launch with configuration `cfg`; it writes the needed gradients completely."""
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        num_m, num_programs, num_helpers = schedule(cfg)
        num_slots = _num_slots(n_rows, num_m, d_in, d_out, r_pad, x2d.element_size(), num_helpers)
        # the kernel's workspace offsets are int32: slots * r_pad * d stays far below 2^31 by the cap above
        assert num_slots * r_pad * max(d_in, d_out) < 2**31, "partial-sum workspace too large for int32 offsets"
        # workspaces: s v (input dtype); float32 partial sums and the reduced dA, dB, carved from one
        # allocation. An argument that is not needed gets the flags tensor as a placeholder: its constexpr
        # switch keeps the kernel from touching it.
        flags = _flags(4 + num_m + num_slots, x2d)
        sv = torch.empty((n_rows, r_pad), device=device, dtype=dtype)
        sizes = {"part_a": (num_slots, r_pad, d_in) if need_dtheta else None,
                 "part_b": (num_slots, d_out, r_pad) if need_dtheta else None,
                 "part_db": (num_slots, d_out) if need_dbias else None,
                 "grad_a": (r_pad, d_in) if need_dtheta else None,
                 "grad_b": (d_out, r_pad) if need_dtheta else None}
        numels = {name: (math.prod(shape) if shape else 0) for name, shape in sizes.items()}
        work = torch.empty(sum(numels.values()), device=device,
                           dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        views, offset = {}, 0
        for name, shape in sizes.items():
            views[name] = work[offset:offset + numels[name]].view(shape) if shape else flags
            offset += numels[name]
        part_a, part_b, part_db, grad_a, grad_b = (views[k] for k in ("part_a", "part_b", "part_db", "grad_a", "grad_b"))
        seed_t, keep_scale, threshold = _seed_args(seed, dropout_p, flags)
        if use_tma:
            descs = (_descriptor(grad_y, (bm, bk)), _descriptor(weight, (bk, bn)), _descriptor(dx, (bm, bn)))
        else:  # placeholders: USE_TMA=False keeps the kernel from touching them
            descs = (grad_y, weight, x2d)
        args = (grad_y, x2d, weight, lora_a, lora_b, u, dx, dta, dtb, db,
                sv, part_a, part_b, part_db, grad_a, grad_b, flags, seed_t, *descs,
                n_rows, d_in, d_out, rank, num_slots,
                grad_y.stride(0), grad_y.stride(1), x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
                dx.stride(0) if need_dx else 0, dx.stride(1) if need_dx else 0,
                float(scaling), keep_scale, threshold, num_programs, num_helpers, LOOKAHEAD_GROUPS, 0.0)
        meta = dict(switches, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], RED_BLOCK=red_block,
                    DT_BLOCK=dt_block, R_PAD=r_pad, SPLIT_ACC=dtype == torch.float32, FLATTEN=FLATTEN,
                    FLAG_BLOCK=FLAG_BLOCK, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                    **_helper_loop(dtype, r_pad))
        _launch(_condlora_bwd_kernel, (num_programs,), args, meta, x2d, quiet=quiet)

    heuristic = _bwd_config(n_rows, d_in, r_pad, dtype, has_dropout)
    if _tuning_fixed(BWD_CONFIG_OVERRIDE, HELPERS_OVERRIDE):
        run(heuristic)
    else:
        key = autotune.make_key("condlora_bwd", device, dtype, r_pad, d_in, d_out, n_rows, **switches)
        autotune.run_tuned(
            key, dict(heuristic, HELPER_SCALE=1.0),
            lambda: autotune.backward_candidates(heuristic, dtype, r_pad, has_dropout, _helper_loop(dtype, r_pad),
                                                 autotune.shared_memory_limit(device), lambda c: schedule(c)[2]),
            run, device_type=device.type, tracing=_tracing(x2d), n_rows=n_rows)
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


def _backward_contiguous(grad_y, x2d, weight, lora_a, lora_b, u, scaling, dropout_p, seed, paper_mode, need_dx,
                         need_dtheta, need_dbias):
    return condlora_backward_launch(grad_y, x2d, weight, lora_a.contiguous(), lora_b.contiguous(), u.contiguous(),
                                    scaling, dropout_p, seed, paper_mode, need_dx, need_dtheta, need_dbias)


@torch.library.triton_op("condlora_triton::backward", mutates_args=())
def backward_op(grad_y: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                lora_b: torch.Tensor, u: torch.Tensor, scaling: float, dropout_p: float, seed: Optional[torch.Tensor],
                paper_mode: bool, need_dx: bool, need_dtheta: bool,
                need_dbias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dtheta_a, dtheta_b, dbias) of the CondLoRA backward, in one launch (empty where not needed)."""
    return _backward_contiguous(grad_y, x2d, weight, lora_a, lora_b, u, scaling, dropout_p, seed, paper_mode,
                                need_dx, need_dtheta, need_dbias)


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

    # Under torch.compile the registered ops are what gets traced. In eager mode the launchers are called
    # directly: the same kernels, without the custom-op dispatcher, which costs more host time per call
    # (measured on the H100 machine, benchmarks/NOTES.md) than a small layer's whole GPU time.

    @staticmethod
    def forward(x2d, weight, bias, theta_a, theta_b, scaling, dropout_p, seed, mode):
        op = torch.ops.condlora_triton.forward if torch.compiler.is_compiling() else condlora_forward_launch
        y, u, lora_a, lora_b = op(x2d, weight, bias, theta_a, theta_b, scaling, dropout_p, seed, mode == "paper")
        return reference.ForwardOutputs(y, u, lora_a, lora_b)

    @staticmethod
    def backward(grad_y, x2d, weight, theta_a, theta_b, u, lora_a, lora_b, scaling, dropout_p, seed, mode, needs):
        need_x, need_ta, need_tb, need_b = needs
        if torch.compiler.is_compiling():
            op = torch.ops.condlora_triton.backward
        else:
            op = _backward_contiguous
        dx, dta, dtb, db = op(grad_y, x2d, weight, lora_a, lora_b, u, scaling, dropout_p, seed, mode == "paper",
                              need_x, need_ta or need_tb, need_b)
        return reference.BackwardOutputs(dx if need_x else None, dta if need_ta else None,
                                         dtb if need_tb else None, db if need_b else None)
