"""Fused Triton kernels for CondLoRA: the whole forward in one launch, the whole backward in one launch.

Read top to bottom: the jit helpers (dropout mask, dependency flags, tile schedule), the forward kernel
and its launcher `condlora_forward_launch`, the backward kernel and its launcher
`condlora_backward_launch`, the torch.library registration (opaque custom ops that compiled graphs
call with real tensors), and `TritonBackend`, which the autograd Function in ops/condlora_linear.py
calls. How a launch is configured (tiles, programs, helpers, slots, autotuning) is in config.py and
autotune.py, what it needs at run time (flags, descriptors, the launch) in runtime.py.

Notation: N tokens (rows of x), d_in, d_out, rank r (padded to R_PAD >= 16 for tl.dot), s = alpha / r,
x_hat = dropout(x), A = lora_a (r, d_in), B = lora_b (d_out, r), u = x_hat A^T (N, r).

Design (docs/design.md §5): one persistent launch per direction, with a grid of at most one program
per SM, all resident at once. A tile that needs another's result spins on a flag in global memory
(acquire) that the producer sets after its stores (barrier, then release); every wait points to work
that no waiting program stands in front of, so the launch cannot deadlock. Under TRITON_INTERPRET
programs run one after another, so P = 1 there and each program does its phases in turn.

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

Backward: the chain rule of docs/design.md §2 (v, dx, dA, dB, dtheta, db). Roles instead of one list: a few *helper* programs do the rank-r work row block by row block, the
other *worker* programs run the input-gradient GEMM in a flattened loop, then all share the tail.
    helper, row block m   one pass over dy[m]: v[m] = dy[m] B (stored as s v[m] and published at once),
                          the partial sums s dy[m]^T u[m] (of dB) and sum_rows dy[m] (of db); then one
                          pass over x[m]: the partial sum (s v[m])^T x_hat[m] (of dA). A helper starts
                          row block m only while within `lookahead` groups of the workers.
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
import types
from dataclasses import replace
from typing import Optional

import torch
import triton
import triton.language as tl

from condlora_kernels import reference
from condlora_kernels.kernels.triton import autotune, runtime
from condlora_kernels.kernels.triton import config as launch_config
from condlora_kernels.kernels.triton.config import BackwardConfig, ForwardConfig

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
def dropout_keep(seed_lo, seed_hi, rows, col_start, d_in, drop_threshold,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Keep mask of the tile x[rows, col_start : col_start + BLOCK_C] (col_start a multiple of 8).

    As reference.dropout_draws (docs/design.md §3): element (row, col) takes half-word col % 8 of the
    Philox counter row * ceil(d_in / 8) + col // 8, so one Philox call serves 8 elements; keep when
    draw >= threshold.
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
def load_seed(seed_ptr):
    """The dropout seed (one int64 in device memory) as the Philox key's two uint32 halves."""
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
# forward: kernel and launcher
# ==================================================================================================


@triton.jit
def _fwd_gen_rows(w_ptr, ta_ptr, tb_ptr, a_ptr, b_ptr,  # W0, theta_a, theta_b in; A, B out
                  tile, d_in, d_out, rank,
                  stride_wn, stride_wk, stride_ta, stride_tb,
                  zero,
                  MODE_PAPER: tl.constexpr,
                  GEN_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, SPLIT_ACC: tl.constexpr):
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
def _fwd_gen_cols(w_ptr, ta_ptr, a_ptr,  # W0, theta_a in; A out
                  tile, d_in, d_out, rank,
                  stride_wn, stride_wk, stride_ta,
                  zero,
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
def _fwd_u_tile(x_ptr, a_ptr, u_ptr,  # x, A in; u out
                m, n_rows, d_in, rank,
                stride_xm, stride_xk,
                seed_lo, seed_hi, drop_threshold, keep_scale, zero,
                HAS_DROPOUT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, R_PAD: tl.constexpr,
                DOT_PRECISION: tl.constexpr, SPLIT_ACC: tl.constexpr):
    """u[rows] = x_hat[rows] A^T, stored in x's dtype (the backward and the Y epilogues read it back).
    The program streams its row block of x alone, a group ahead of the Y tiles that share x's tiles in
    L2: wide chunks, deeply pipelined, keep enough bytes in flight for one SM to read fast."""
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
            keep = dropout_keep(seed_lo, seed_hi, rows, k0, d_in, drop_threshold, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x.to(ACC) * keep_scale, 0.0).to(x.dtype)
        # A was written in this launch by other programs: read through L2 (.cg), never a stale L1 line
        a_t = tl.load(a_ptr + ranks[None, :] * d_in + ks[:, None], mask=(ks[:, None] < d_in) & (ranks[None, :] < rank),
                      other=0.0, cache_modifier=".cg")
        acc = _mma(x, a_t, acc, zero, DOT_PRECISION, SPLIT_ACC)
    tl.store(u_ptr + rows[:, None].to(tl.int64) * rank + ranks[None, :], acc.to(u_ptr.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (ranks[None, :] < rank))


@triton.jit
def _fwd_y_tile(x_ptr, w_ptr, bias_ptr, u_ptr, b_ptr, y_ptr,  # x, W0, b, u, B in; y out
                x_desc, w_desc, y_desc,  # the same through TMA descriptors (USE_TMA)
                u_ready_ptr,  # flag of row block m's u
                m, n,
                n_rows, d_in, d_out, rank,
                stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                scaling, zero,
                HAS_BIAS: tl.constexpr, USE_TMA: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
                DOT_PRECISION: tl.constexpr, SPLIT_ACC: tl.constexpr):
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
    _store_tile(desc=y_desc, ptr=y_ptr, acc=acc, m=m, n=n, rows=rows, cols=cols, n_rows=n_rows, n_cols=d_out,
                stride_r=stride_ym, stride_c=stride_yn, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, USE_TMA=USE_TMA)


@triton.jit
def condlora_forward_kernel(
    # tensors
    x_ptr,  # x (N, d_in)
    w_ptr,  # W0 (d_out, d_in)
    bias_ptr,  # b (d_out,); a placeholder without HAS_BIAS
    ta_ptr,  # theta_a, contiguous rows
    tb_ptr,  # theta_b (r, d_in), contiguous rows
    y_ptr,  # out: y (N, d_out)
    u_ptr,  # out: u (N, r), contiguous
    a_ptr,  # out: A (r, d_in), contiguous
    b_ptr,  # out: B (d_out, r), contiguous
    flags_ptr,  # int32 dependency flags, zero on entry and on exit
    seed_ptr,  # int64 dropout seed; a placeholder without HAS_DROPOUT
    # TMA descriptors of x, W0, y (placeholders without USE_TMA)
    x_desc,
    w_desc,
    y_desc,
    # sizes
    n_rows,
    d_in,
    d_out,
    rank,
    # strides
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ta,
    stride_tb,
    stride_ym,
    stride_yn,
    # scalars
    scaling,  # s = alpha / r
    keep_scale,  # 1 / (1 - p) of the quantised dropout p
    drop_threshold,  # 16-bit draws below it are dropped
    num_programs,  # the grid: programs take tiles p, p + num_programs, ...
    zero,  # a runtime 0.0 (see _mma)
    # switches
    MODE_PAPER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    USE_TMA: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    GEN_BLOCK: tl.constexpr,  # rows (columns) of W0 per GEN tile
    HELPER_BLOCK_K: tl.constexpr,  # chunk width of the U tiles' loop over x
    HELPER_STAGES: tl.constexpr,  # its pipeline depth
    R_PAD: tl.constexpr,
    # precision and bookkeeping
    DOT_PRECISION: tl.constexpr,
    SPLIT_ACC: tl.constexpr,  # float32: sum each BLOCK_K slice on its own (see _mma)
    FLAG_BLOCK: tl.constexpr,
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
        seed_lo, seed_hi = load_seed(seed_ptr)

    for t in range(tl.program_id(0), num_tiles, num_programs):
        if t < num_gen:
            if t < num_gen_rows:
                _fwd_gen_rows(w_ptr=w_ptr, ta_ptr=ta_ptr, tb_ptr=tb_ptr, a_ptr=a_ptr, b_ptr=b_ptr,
                              tile=t, d_in=d_in, d_out=d_out, rank=rank,
                              stride_wn=stride_wn, stride_wk=stride_wk, stride_ta=stride_ta, stride_tb=stride_tb,
                              zero=zero, MODE_PAPER=MODE_PAPER, GEN_BLOCK=GEN_BLOCK, BLOCK_K=BLOCK_K, R_PAD=R_PAD,
                              DOT_PRECISION=DOT_PRECISION, SPLIT_ACC=SPLIT_ACC)
            else:
                _fwd_gen_cols(w_ptr=w_ptr, ta_ptr=ta_ptr, a_ptr=a_ptr,
                              tile=t - num_gen_rows, d_in=d_in, d_out=d_out, rank=rank,
                              stride_wn=stride_wn, stride_wk=stride_wk, stride_ta=stride_ta,
                              zero=zero, GEN_BLOCK=GEN_BLOCK, BLOCK_K=BLOCK_K, R_PAD=R_PAD,
                              DOT_PRECISION=DOT_PRECISION, SPLIT_ACC=SPLIT_ACC)
            _signal(gen_done_ptr)
        else:
            kind, m, n = _lookahead_tile(t - num_gen, num_m, num_n, GROUP_M)
            if kind == 0:
                _wait_at_least(gen_done_ptr, num_gen)
                _fwd_u_tile(x_ptr=x_ptr, a_ptr=a_ptr, u_ptr=u_ptr,
                            m=m, n_rows=n_rows, d_in=d_in, rank=rank,
                            stride_xm=stride_xm, stride_xk=stride_xk,
                            seed_lo=seed_lo, seed_hi=seed_hi, drop_threshold=drop_threshold, keep_scale=keep_scale,
                            zero=zero, HAS_DROPOUT=HAS_DROPOUT,
                            BLOCK_M=BLOCK_M, BLOCK_K=HELPER_BLOCK_K, STAGES=HELPER_STAGES, R_PAD=R_PAD,
                            DOT_PRECISION=DOT_PRECISION, SPLIT_ACC=SPLIT_ACC)
                _signal(u_ready_ptr + m)
            elif kind == 1:
                _fwd_y_tile(x_ptr=x_ptr, w_ptr=w_ptr, bias_ptr=bias_ptr, u_ptr=u_ptr, b_ptr=b_ptr, y_ptr=y_ptr,
                            x_desc=x_desc, w_desc=w_desc, y_desc=y_desc, u_ready_ptr=u_ready_ptr,
                            m=m, n=n, n_rows=n_rows, d_in=d_in, d_out=d_out, rank=rank,
                            stride_xm=stride_xm, stride_xk=stride_xk, stride_wn=stride_wn, stride_wk=stride_wk,
                            stride_ym=stride_ym, stride_yn=stride_yn,
                            scaling=scaling, zero=zero, HAS_BIAS=HAS_BIAS, USE_TMA=USE_TMA,
                            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, R_PAD=R_PAD,
                            DOT_PRECISION=DOT_PRECISION, SPLIT_ACC=SPLIT_ACC)
    _exit_and_reset_flags(flags_ptr, 2 + num_m, num_programs, FLAG_BLOCK)


def condlora_forward_launch(x2d, weight, bias, theta_a, theta_b, scaling: float, dropout_p: float,
                            seed: Optional[torch.Tensor], paper_mode: bool, *,
                            config: Optional[ForwardConfig] = None, reuse_flags: bool = True):
    """Allocate y, u, A, B and run the persistent forward kernel. Returns (y, u, lora_a, lora_b).

    `config` (config.ForwardConfig) fixes the launch: its tile and main loop, the heuristic's where a
    field is None, and nothing is tuned (for kernel development: tools/explore.py sweeps it). Without
    it, the autotuned configuration (autotune.py), or the heuristic one where tuning is off."""
    n_rows, d_in = x2d.shape
    d_out = weight.shape[0]
    rank = theta_b.shape[0]
    r_pad = launch_config.r_pad(rank)
    device, dtype = x2d.device, x2d.dtype
    y = torch.empty((n_rows, d_out), device=device, dtype=dtype)
    u = torch.empty((n_rows, rank), device=device, dtype=dtype)
    lora_a = torch.empty((rank, d_in), device=device, dtype=dtype)
    lora_b = torch.empty((d_out, rank), device=device, dtype=dtype)
    theta_a = theta_a.contiguous()
    theta_b = theta_b.contiguous()
    gen_block = launch_config.side_block()
    num_gen = triton.cdiv(d_out, gen_block) + (0 if paper_mode else triton.cdiv(d_in, gen_block))
    use_tma = launch_config.use_tma(n_rows * d_in * d_out, x2d, weight, y,
                                    requested=config.use_tma if config else None) and n_rows > 0
    switches = launch_config.forward_switches(paper_mode=paper_mode, has_bias=bias is not None,
                                              has_dropout=dropout_p > 0.0, use_tma=use_tma, dtype=dtype)

    def run(cfg: ForwardConfig, quiet: bool = False) -> None:
        """One launch with configuration `cfg`; it writes y, u, A and B completely."""
        tile = cfg.tile
        num_m = triton.cdiv(n_rows, tile.block_m)
        num_heads = (triton.cdiv(num_m, tile.group_m) + 1) * tile.group_m  # _lookahead_tile's U slots
        num_tiles = num_gen + num_heads + num_m * triton.cdiv(d_out, tile.block_n)
        num_programs = launch_config.num_programs(device, num_tiles)
        flags = runtime.flags(2 + num_m, x2d, reuse=reuse_flags)
        seed_t, keep_scale, threshold = runtime.dropout_args(seed, dropout_p, flags)
        if use_tma:
            descs = dict(x_desc=runtime.descriptor(x2d, (tile.block_m, tile.block_k)),
                         w_desc=runtime.descriptor(weight, (tile.block_n, tile.block_k)),
                         y_desc=runtime.descriptor(y, (tile.block_m, tile.block_n)))
        else:  # placeholders: USE_TMA=False keeps the kernel from touching them
            descs = dict(x_desc=x2d, w_desc=weight, y_desc=y)
        args = dict(x_ptr=x2d, w_ptr=weight, bias_ptr=bias if bias is not None else y, ta_ptr=theta_a, tb_ptr=theta_b,
                    y_ptr=y, u_ptr=u, a_ptr=lora_a, b_ptr=lora_b, flags_ptr=flags, seed_ptr=seed_t,
                    **descs,
                    n_rows=n_rows, d_in=d_in, d_out=d_out, rank=rank,
                    stride_xm=x2d.stride(0), stride_xk=x2d.stride(1), stride_wn=weight.stride(0),
                    stride_wk=weight.stride(1), stride_ta=theta_a.stride(0), stride_tb=theta_b.stride(0),
                    stride_ym=y.stride(0), stride_yn=y.stride(1),
                    scaling=float(scaling), keep_scale=keep_scale, drop_threshold=threshold,
                    num_programs=num_programs, zero=0.0)
        meta = launch_config.forward_meta(tile, switches, dtype, r_pad)
        runtime.launch(condlora_forward_kernel, (num_programs,), args, meta, x2d, quiet=quiet)

    heuristic = ForwardConfig(launch_config.forward_tile(n_rows, d_out, r_pad, dtype))
    if config is not None:
        run(replace(config, tile=config.tile or heuristic.tile))
    elif not autotune.enabled():
        run(heuristic)
    else:
        key = autotune.make_key("condlora_fwd", device, dtype, r_pad, d_in, d_out, n_rows, **switches)
        autotune.run_tuned(
            key, heuristic,
            lambda: launch_config.forward_candidates(heuristic, dtype, r_pad, launch_config.helper_loop(dtype, r_pad),
                                                     runtime.shared_memory_limit(device)),
            run, device_type=device.type, tracing=runtime.tracing(x2d), n_rows=n_rows)
    return y, u, lora_a, lora_b


# ==================================================================================================
# backward: kernel and launcher
# ==================================================================================================


@triton.jit
def _bwd_row_block(dy_ptr, x_ptr, b_ptr, u_ptr,  # dy, x, B, u in
                   sv_ptr, part_a_ptr, part_b_ptr, part_db_ptr,  # out: s v, the partial sums of dA, dB, db
                   ticket_ptr, v_ready_ptr,  # flags: whose turn it is per slot; row block m's v stored
                   m, num_slots, n_rows, d_in, d_out, rank,
                   stride_dym, stride_dyn, stride_xm, stride_xk,
                   scaling, seed_lo, seed_hi, drop_threshold, keep_scale, zero,
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
                keep = dropout_keep(seed_lo, seed_hi, rows, k0, d_in, drop_threshold, BLOCK_M, BLOCK_K)
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
def _bwd_dx_tile(dy_ptr, w_ptr, a_ptr, sv_ptr, dx_ptr,  # dy, W0, A, s v in; dx out
                 dy_desc, w_desc, dx_desc,  # the same through TMA descriptors (USE_TMA)
                 v_ready_ptr,  # flags: row block m's v stored
                 m, k,
                 n_rows, d_in, d_out, rank,
                 stride_dym, stride_dyn, stride_wn, stride_wk, stride_dxm, stride_dxk,
                 seed_lo, seed_hi, drop_threshold, keep_scale, zero,
                 HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, SPLIT_ACC: tl.constexpr):
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
        keep = dropout_keep(seed_lo, seed_hi, rows, k * BLOCK_N, d_in, drop_threshold, BLOCK_M, BLOCK_N)
        acc += tl.where(keep, low_rank * keep_scale, 0.0).to(ACC)  # keep_scale may come in as float64
    else:
        acc = tl.dot(sv, a, acc, input_precision=DOT_PRECISION)
    _store_tile(desc=dx_desc, ptr=dx_ptr, acc=acc, m=m, n=k, rows=rows, cols=cols, n_rows=n_rows, n_cols=d_in,
                stride_r=stride_dxm, stride_c=stride_dxk, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, USE_TMA=USE_TMA)


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
def _bwd_dtheta_tile(w_ptr, grad_a_ptr, grad_b_ptr, dta_ptr, dtb_ptr,  # W0, dA, dB in; dtheta_a, dtheta_b out
                     tile, d_in, d_out, rank,
                     stride_wn, stride_wk,
                     zero,
                     MODE_PAPER: tl.constexpr,
                     DT_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
                     F32_DOT_PRECISION: tl.constexpr, SPLIT_ACC: tl.constexpr):
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
def condlora_backward_kernel(
    # tensors
    dy_ptr,  # dy (N, d_out)
    x_ptr,  # x (N, d_in)
    w_ptr,  # W0 (d_out, d_in)
    a_ptr,  # A (r, d_in), contiguous
    b_ptr,  # B (d_out, r), contiguous
    u_ptr,  # u (N, r), contiguous
    dx_ptr,  # out: dx (N, d_in)
    dta_ptr,  # out: dtheta_a, contiguous
    dtb_ptr,  # out: dtheta_b (r, d_in), contiguous
    db_ptr,  # out: db (d_out,)
    # workspaces (a gradient not needed gets a placeholder, which its switch keeps the kernel from touching)
    sv_ptr,  # s v (N, R_PAD), input dtype
    part_a_ptr,  # float32 partial sums of dA (S, R_PAD, d_in)
    part_b_ptr,  # float32 partial sums of dB (S, d_out, R_PAD)
    part_db_ptr,  # float32 partial sums of db (S, d_out)
    grad_a_ptr,  # float32 dA (R_PAD, d_in)
    grad_b_ptr,  # float32 dB (d_out, R_PAD)
    flags_ptr,  # int32 dependency flags, zero on entry and on exit
    seed_ptr,  # int64 dropout seed; a placeholder without HAS_DROPOUT
    # TMA descriptors of dy, W0, dx (placeholders without USE_TMA)
    dy_desc,
    w_desc,
    dx_desc,
    # sizes
    n_rows,
    d_in,
    d_out,
    rank,
    num_slots,  # S, partial-sum slots
    # strides
    stride_dym,
    stride_dyn,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_dxm,
    stride_dxk,
    # scalars
    scaling,  # s = alpha / r
    keep_scale,  # 1 / (1 - p) of the quantised dropout p
    drop_threshold,  # 16-bit draws below it are dropped
    num_programs,  # the grid
    num_helpers,  # programs 0 .. num_helpers - 1 are helpers, the others workers
    lookahead,  # groups of row blocks the helpers may run ahead of the workers
    zero,  # a runtime 0.0 (see _mma)
    # switches
    MODE_PAPER: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    USE_TMA: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_DTHETA: tl.constexpr,
    NEED_DBIAS: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    RED_BLOCK: tl.constexpr,  # columns (rows) of dA (dB, db) per RED tile
    DT_BLOCK: tl.constexpr,  # columns (rows) of dtheta per DTHETA tile
    HELPER_BLOCK_K: tl.constexpr,  # chunk width of the helpers' loops over dy and x
    HELPER_STAGES: tl.constexpr,  # their pipeline depth
    R_PAD: tl.constexpr,
    # precision and bookkeeping
    DOT_PRECISION: tl.constexpr,
    F32_DOT_PRECISION: tl.constexpr,  # of the DTHETA dots on float32 dA, dB
    SPLIT_ACC: tl.constexpr,  # float32: sum each BLOCK_K slice on its own (see _mma)
    FLATTEN: tl.constexpr,  # flatten the workers' persistent loop
    FLAG_BLOCK: tl.constexpr,
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
        seed_lo, seed_hi = load_seed(seed_ptr)

    single = num_programs == 1
    if pid < num_helpers:
        for m in range(pid, num_m, num_helpers):
            if NEED_DX and not single:  # stay within `lookahead` groups of the workers
                _wait_at_least(dx_done_ptr, (m // GROUP_M - lookahead) * GROUP_M * num_k)
            _bwd_row_block(dy_ptr=dy_ptr, x_ptr=x_ptr, b_ptr=b_ptr, u_ptr=u_ptr,
                           sv_ptr=sv_ptr, part_a_ptr=part_a_ptr, part_b_ptr=part_b_ptr, part_db_ptr=part_db_ptr,
                           ticket_ptr=ticket_ptr, v_ready_ptr=v_ready_ptr,
                           m=m, num_slots=num_slots, n_rows=n_rows, d_in=d_in, d_out=d_out, rank=rank,
                           stride_dym=stride_dym, stride_dyn=stride_dyn, stride_xm=stride_xm, stride_xk=stride_xk,
                           scaling=scaling, seed_lo=seed_lo, seed_hi=seed_hi, drop_threshold=drop_threshold,
                           keep_scale=keep_scale, zero=zero,
                           NEED_DTHETA=NEED_DTHETA, NEED_DBIAS=NEED_DBIAS, HAS_DROPOUT=HAS_DROPOUT,
                           BLOCK_M=BLOCK_M, BLOCK_K=HELPER_BLOCK_K, STAGES=HELPER_STAGES, R_PAD=R_PAD,
                           DOT_PRECISION=DOT_PRECISION, SPLIT_ACC=SPLIT_ACC)
            _signal(rows_done_ptr)
    if NEED_DX:
        if (pid >= num_helpers) | single:
            worker = tl.where(single, 0, pid - num_helpers)
            num_workers = tl.where(single, 1, num_programs - num_helpers)
            for t in tl.range(worker, num_m * num_k, num_workers, flatten=FLATTEN):
                m, k = _grouped_tile(t, num_m, num_k, GROUP_M)
                _bwd_dx_tile(dy_ptr=dy_ptr, w_ptr=w_ptr, a_ptr=a_ptr, sv_ptr=sv_ptr, dx_ptr=dx_ptr,
                             dy_desc=dy_desc, w_desc=w_desc, dx_desc=dx_desc, v_ready_ptr=v_ready_ptr,
                             m=m, k=k, n_rows=n_rows, d_in=d_in, d_out=d_out, rank=rank,
                             stride_dym=stride_dym, stride_dyn=stride_dyn, stride_wn=stride_wn, stride_wk=stride_wk,
                             stride_dxm=stride_dxm, stride_dxk=stride_dxk,
                             seed_lo=seed_lo, seed_hi=seed_hi, drop_threshold=drop_threshold,
                             keep_scale=keep_scale, zero=zero, HAS_DROPOUT=HAS_DROPOUT, USE_TMA=USE_TMA,
                             BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, R_PAD=R_PAD,
                             DOT_PRECISION=DOT_PRECISION, SPLIT_ACC=SPLIT_ACC)
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
                    _bwd_dtheta_tile(w_ptr=w_ptr, grad_a_ptr=grad_a_ptr, grad_b_ptr=grad_b_ptr,
                                     dta_ptr=dta_ptr, dtb_ptr=dtb_ptr,
                                     tile=t - num_red, d_in=d_in, d_out=d_out, rank=rank,
                                     stride_wn=stride_wn, stride_wk=stride_wk, zero=zero, MODE_PAPER=MODE_PAPER,
                                     DT_BLOCK=DT_BLOCK, BLOCK_K=BLOCK_K, R_PAD=R_PAD,
                                     F32_DOT_PRECISION=F32_DOT_PRECISION, SPLIT_ACC=SPLIT_ACC)
    _exit_and_reset_flags(flags_ptr, 4 + num_m + num_slots, num_programs, FLAG_BLOCK)


def condlora_backward_launch(grad_y, x2d, weight, lora_a, lora_b, u, scaling: float, dropout_p: float,
                             seed: Optional[torch.Tensor], paper_mode: bool, need_dx: bool, need_dtheta: bool,
                             need_dbias: bool, *, config: Optional[BackwardConfig] = None,
                             reuse_flags: bool = True):
    """Allocate gradients and workspaces and run the persistent backward kernel.
    Returns (dx, dtheta_a, dtheta_b, dbias), empty tensors for those not needed.

    `config` (config.BackwardConfig) fixes the launch: its tile, helper count, partial-sum slots,
    lookahead and main loop, the heuristic's where a field is None, and nothing is tuned (for kernel
    development and tests: tools/explore.py sweeps it). Without it, the autotuned configuration
    (autotune.py), or the heuristic one where tuning is off."""
    n_rows, d_in = x2d.shape
    d_out, rank = lora_b.shape
    r_pad = launch_config.r_pad(rank)
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
    use_tma = need_dx and launch_config.use_tma(n_rows * d_in * d_out, grad_y, weight, dx,
                                                requested=config.use_tma if config else None)
    switches = launch_config.backward_switches(paper_mode=paper_mode, has_dropout=has_dropout, use_tma=use_tma,
                                               need_dx=need_dx, need_dtheta=need_dtheta, need_dbias=need_dbias,
                                               dtype=dtype)

    def schedule(cfg: BackwardConfig) -> tuple[int, int, int]:
        """(row blocks, programs, helper programs) of a launch with configuration `cfg`."""
        num_m = triton.cdiv(n_rows, cfg.tile.block_m)
        work_items = num_m * triton.cdiv(d_in, cfg.tile.block_n) + 1 if need_dx else num_m
        num_programs = launch_config.num_programs(device, work_items)
        num_helpers = launch_config.num_helpers(num_programs, helper_bytes, worker_flops, num_m, min_helpers=8,
                                                scale=cfg.helper_scale, requested=cfg.num_helpers)
        return num_m, num_programs, num_helpers

    def run(cfg: BackwardConfig, quiet: bool = False) -> None:
        """One launch with configuration `cfg`; it writes the needed gradients completely."""
        tile = cfg.tile
        num_m, num_programs, num_helpers = schedule(cfg)
        num_slots = launch_config.num_slots(n_rows, num_m, d_in, d_out, r_pad, x2d.element_size(), cfg.max_slots)
        # the kernel's workspace offsets are int32: slots * r_pad * d stays far below 2^31 by the cap above
        assert num_slots * r_pad * max(d_in, d_out) < 2**31, "partial-sum workspace too large for int32 offsets"
        # workspaces: s v (input dtype); float32 partial sums and the reduced dA, dB, carved from one
        # allocation. An argument that is not needed gets the flags tensor as a placeholder: its constexpr
        # switch keeps the kernel from touching it.
        flags = runtime.flags(4 + num_m + num_slots, x2d, reuse=reuse_flags)
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
            views[f"{name}_ptr"] = work[offset:offset + numels[name]].view(shape) if shape else flags
            offset += numels[name]
        seed_t, keep_scale, threshold = runtime.dropout_args(seed, dropout_p, flags)
        if use_tma:
            descs = dict(dy_desc=runtime.descriptor(grad_y, (tile.block_m, tile.block_k)),
                         w_desc=runtime.descriptor(weight, (tile.block_k, tile.block_n)),
                         dx_desc=runtime.descriptor(dx, (tile.block_m, tile.block_n)))
        else:  # placeholders: USE_TMA=False keeps the kernel from touching them
            descs = dict(dy_desc=grad_y, w_desc=weight, dx_desc=x2d)
        args = dict(dy_ptr=grad_y, x_ptr=x2d, w_ptr=weight, a_ptr=lora_a, b_ptr=lora_b, u_ptr=u,
                    dx_ptr=dx, dta_ptr=dta, dtb_ptr=dtb, db_ptr=db,
                    sv_ptr=sv, **views, flags_ptr=flags, seed_ptr=seed_t,
                    **descs,
                    n_rows=n_rows, d_in=d_in, d_out=d_out, rank=rank, num_slots=num_slots,
                    stride_dym=grad_y.stride(0), stride_dyn=grad_y.stride(1), stride_xm=x2d.stride(0),
                    stride_xk=x2d.stride(1), stride_wn=weight.stride(0), stride_wk=weight.stride(1),
                    stride_dxm=dx.stride(0) if need_dx else 0, stride_dxk=dx.stride(1) if need_dx else 0,
                    scaling=float(scaling), keep_scale=keep_scale, drop_threshold=threshold,
                    num_programs=num_programs, num_helpers=num_helpers, lookahead=cfg.lookahead, zero=0.0)
        meta = launch_config.backward_meta(tile, switches, dtype, r_pad)
        runtime.launch(condlora_backward_kernel, (num_programs,), args, meta, x2d, quiet=quiet)

    heuristic = BackwardConfig(launch_config.backward_tile(n_rows, d_in, r_pad, dtype, has_dropout))
    if config is not None:
        run(replace(config, tile=config.tile or heuristic.tile))
    elif not autotune.enabled():
        run(heuristic)
    else:
        key = autotune.make_key("condlora_bwd", device, dtype, r_pad, d_in, d_out, n_rows, **switches)
        autotune.run_tuned(
            key, heuristic,
            lambda: launch_config.backward_candidates(heuristic, dtype, r_pad, has_dropout,
                                                      launch_config.helper_loop(dtype, r_pad),
                                                      runtime.shared_memory_limit(device), lambda c: schedule(c)[2]),
            run, device_type=device.type, tracing=runtime.tracing(x2d), n_rows=n_rows)
    return dx, dta, dtb, db


# ==================================================================================================
# torch.library registration: opaque to autograd (the Function in ops/ drives them) and to torch.compile,
# whose graphs call them with real tensors: the same launch as in eager mode (TMA main loops, the tuned
# configuration), so compiling never makes these kernels slower (docs/design.md §5)
# ==================================================================================================


@torch.library.custom_op("condlora_triton::forward", mutates_args=())
def forward_op(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], theta_a: torch.Tensor,
               theta_b: torch.Tensor, scaling: float, dropout_p: float, seed: Optional[torch.Tensor],
               paper_mode: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, u, lora_a, lora_b) of the CondLoRA forward, in one launch. Compiled graphs call this op: fresh flags
    (runtime.flags), since a buffer kept across calls would outlive a CUDA graph's memory pool."""
    return condlora_forward_launch(x2d, weight, bias, theta_a, theta_b, scaling, dropout_p, seed, paper_mode,
                                   reuse_flags=False)


@forward_op.register_fake
def _forward_fake(x2d, weight, bias, theta_a, theta_b, scaling, dropout_p, seed, paper_mode):
    n_rows, d_in = x2d.shape
    d_out, rank = weight.shape[0], theta_b.shape[0]
    return (x2d.new_empty(n_rows, d_out), x2d.new_empty(n_rows, rank), x2d.new_empty(rank, d_in),
            x2d.new_empty(d_out, rank))


def _backward_contiguous(grad_y, x2d, weight, lora_a, lora_b, u, scaling, dropout_p, seed, paper_mode, need_dx,
                         need_dtheta, need_dbias, config: Optional[BackwardConfig] = None, reuse_flags: bool = True):
    return condlora_backward_launch(grad_y, x2d, weight, lora_a.contiguous(), lora_b.contiguous(), u.contiguous(),
                                    scaling, dropout_p, seed, paper_mode, need_dx, need_dtheta, need_dbias,
                                    config=config, reuse_flags=reuse_flags)


@torch.library.custom_op("condlora_triton::backward", mutates_args=())
def backward_op(grad_y: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                lora_b: torch.Tensor, u: torch.Tensor, scaling: float, dropout_p: float, seed: Optional[torch.Tensor],
                paper_mode: bool, need_dx: bool, need_dtheta: bool,
                need_dbias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dtheta_a, dtheta_b, dbias) of the CondLoRA backward, in one launch (empty where not needed); fresh
    flags, as in forward_op."""
    return _backward_contiguous(grad_y, x2d, weight, lora_a, lora_b, u, scaling, dropout_p, seed, paper_mode,
                                need_dx, need_dtheta, need_dbias, reuse_flags=False)


@backward_op.register_fake
def _backward_fake(grad_y, x2d, weight, lora_a, lora_b, u, scaling, dropout_p, seed, paper_mode, need_dx,
                   need_dtheta, need_dbias):
    n_rows, d_in = x2d.shape
    d_out, rank = lora_b.shape

    def output(shape, needed):
        return x2d.new_empty(shape if needed else (0,))

    theta_a_shape = reference.theta_a_shape(rank, d_out, d_in, "paper" if paper_mode else "general")
    return (output((n_rows, d_in), need_dx), output(theta_a_shape, need_dtheta), output((rank, d_in), need_dtheta),
            output((d_out,), need_dbias))


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
        if x.device.type == "cpu" and runtime.interpreting():
            if x.dtype not in INTERPRETER_DTYPES:
                return f"under TRITON_INTERPRET the Triton kernels take float16, float32 or float64, not {x.dtype}"
            return None
        return f"the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {x.device.type}"

    # Under torch.compile the registered ops are what gets traced. In eager mode the launchers are called
    # directly: the same kernels, without the custom-op dispatcher, which costs more host time per call
    # (measured on the H100 machine, benchmarks/NOTES.md) than a small layer's whole GPU time. A launch
    # `config` applies to those eager calls.

    @staticmethod
    def forward(x2d, weight, bias, theta_a, theta_b, scaling, dropout_p, seed, mode,
                config: Optional[ForwardConfig] = None):
        args = (x2d, weight, bias, theta_a, theta_b, scaling, dropout_p, seed, mode == "paper")
        if torch.compiler.is_compiling():
            y, u, lora_a, lora_b = torch.ops.condlora_triton.forward(*args)
        else:
            y, u, lora_a, lora_b = condlora_forward_launch(*args, config=config)
        return reference.ForwardOutputs(y, u, lora_a, lora_b)

    @staticmethod
    def backward(grad_y, x2d, weight, theta_a, theta_b, u, lora_a, lora_b, scaling, dropout_p, seed, mode, needs,
                 config: Optional[BackwardConfig] = None):
        need_x, need_ta, need_tb, need_b = needs
        args = (grad_y, x2d, weight, lora_a, lora_b, u, scaling, dropout_p, seed, mode == "paper",
                need_x, need_ta or need_tb, need_b)
        if torch.compiler.is_compiling():
            dx, dta, dtb, db = torch.ops.condlora_triton.backward(*args)
        else:
            dx, dta, dtb, db = _backward_contiguous(*args, config=config)
        return reference.BackwardOutputs(dx if need_x else None, dta if need_ta else None,
                                         dtb if need_tb else None, db if need_b else None)

    @classmethod
    def with_config(cls, forward: Optional[ForwardConfig] = None, backward: Optional[BackwardConfig] = None):
        """This backend with fixed launch configurations in eager calls (see the launchers' `config`), for
        kernel development and tests, e.g. testing.backend_vs_reference(TritonBackend.with_config(...), ...)."""
        return types.SimpleNamespace(unavailable_reason=cls.unavailable_reason,
                                     forward=functools.partial(cls.forward, config=forward),
                                     backward=functools.partial(cls.backward, config=backward))
