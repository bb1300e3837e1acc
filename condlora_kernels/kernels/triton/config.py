"""Launch configuration of the fused Triton kernels (docs/design.md §5).

    the tile table   every output tile a launch may take, per case (rank, dtype) and direction
    heuristics       forward_tile / backward_tile: the tile a launch takes without measuring
    candidates       forward_candidates / backward_candidates: what the autotuner (autotune.py) races
    configs          ForwardConfig / BackwardConfig: a launch fixed by hand (the launchers' `config=`)
    sizes            programs, helper programs, partial-sum slots, dot precisions, TMA or pointer
                     main loops, and the constexpr arguments of each kernel

Nothing here launches or allocates: it answers from the problem's sizes, the dtype and the GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import triton

from condlora_kernels.kernels.triton import runtime

FLAG_BLOCK = 128  # flags zeroed per step of the reset loop at a launch's exit
FLATTEN = True  # flatten the backward workers' persistent loop (Triton's persistent-matmul tutorial)
LOOKAHEAD_GROUPS = 2  # how many groups of row blocks the backward's helpers may run ahead of its workers

# Building the host-side tensor descriptors costs ~90 us of host time per launch (measured on the H100
# machine, benchmarks/NOTES.md); below this many multiply-adds the GEMM cannot hide it, and the pointer
# main loop, ~10% slower on the GPU, is the faster choice.
TMA_MIN_MACS = 2**35

# Rough per-SM rates that size the backward's helper group: a helper streams rows of x and dy at about
# HELPER_BYTES_PER_S (about 30 GB/s measured on an H100: its loop is bound by latency, not by HBM), a
# worker multiplies at about WORKER_FLOPS_PER_S (bf16). With them num_helpers picks the helper counts
# that measured best on the H100 (16 at d = 4096, 8 at d = 8192, 11-16 for 4096 -> 11008; NOTES.md).
HELPER_BYTES_PER_S = 30e9
WORKER_FLOPS_PER_S = 5e12

# ==================================================================================================
# the tile table
# ==================================================================================================


@dataclass(frozen=True)
class Tile:
    """An output tile of a launch (BLOCK_M x BLOCK_N x BLOCK_K), the pipeline depth and warps of its
    main loop, and GROUP_M, the row blocks of one group of the grouped tile order."""

    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int
    group_m: int = 8

    @property
    def wide(self) -> bool:
        """Larger than 128 x 128: too large for a dropout epilogue's second float32 tile, and for
        problems too small to fill the GPU with such tiles."""
        return self.block_m * self.block_n > 128 * 128

    def meta(self) -> dict:
        """The tile as kernel constexprs and launch options (and as the autotuner's cache file stores it)."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m,
                    num_warps=self.num_warps, num_stages=self.num_stages)

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} w{self.num_warps} s{self.num_stages}"


INTERPRETER_TILE = Tile(32, 32, 32, num_stages=1, num_warps=4, group_m=4)

# Per case, the tiles of the forward (Y tiles) and of the backward (DX tiles), as
#     Tile(BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)
# in the order the heuristics prefer them: the first is the heuristic's tile (forward_tile and
# backward_tile say when they skip wide ones), the others are the alternatives a race may pick.
# tests/test_triton_autotune.py runs every entry on the GPU. From compiling them for sm_80 and sm_90 and
# racing them on an H100: below rank 64 the helper loop's x rows (BLOCK_M x 128 columns, 4 stages) set
# the shared memory (144 KiB on the H100, 108 KiB on sm_80 at BLOCK_M = 128), so a 256-row forward tile
# fits neither GPU (272 KiB on the H100), and the 256-row backward tile the H100 only; backward tiles
# with 4 warps spill registers. 128 x 256 x 64 is the Hopper matmul tutorials' tile (255 registers, no
# spills on sm_90 for r <= 16 when chosen; tools/compile_report.py prints the installed Triton's
# figures), 128 x 128 x 32 in 4 stages the A100-sized one.
TILE_TABLE: dict[str, tuple[tuple[Tile, ...], tuple[Tile, ...]]] = {
    # the rank-r operands take shared memory: small tiles, short pipelines
    "rank >= 128": ((Tile(128, 128, 64, 2, 8), Tile(128, 128, 32, 3, 8), Tile(64, 128, 64, 2, 4),
                     Tile(128, 64, 64, 2, 4)),
                    (Tile(64, 128, 32, 2, 8), Tile(64, 128, 32, 3, 8), Tile(128, 128, 32, 2, 8),
                     Tile(64, 64, 64, 2, 4))),
    # float32 keeps BLOCK_K = 32
    "float32": ((Tile(128, 128, 32, 3, 8), Tile(128, 128, 32, 4, 8), Tile(128, 64, 32, 4, 4),
                 Tile(64, 128, 32, 4, 4)),
                (Tile(128, 128, 32, 3, 8), Tile(128, 128, 32, 4, 8), Tile(64, 128, 32, 4, 4),
                 Tile(128, 64, 32, 4, 4))),
    # u and B take shared memory: wide tiles in two stages (Triton 3.6 needed 262 KiB at 128 x 256 x 3)
    "rank 64": ((Tile(128, 256, 64, 2, 8), Tile(128, 128, 64, 3, 8), Tile(256, 128, 64, 2, 8),
                 Tile(128, 128, 64, 4, 8), Tile(128, 128, 32, 4, 4)),
                (Tile(128, 128, 64, 2, 8), Tile(128, 128, 64, 3, 8), Tile(128, 256, 64, 2, 8),
                 Tile(128, 128, 32, 4, 8))),
    # float16 and bfloat16 below rank 64
    "half": ((Tile(128, 256, 64, 3, 8), Tile(128, 128, 64, 3, 8), Tile(128, 128, 64, 4, 8),
              Tile(128, 128, 32, 4, 4)),
             (Tile(128, 256, 64, 3, 8), Tile(128, 128, 64, 3, 8), Tile(128, 128, 64, 4, 8),
              Tile(256, 128, 64, 3, 8), Tile(128, 128, 32, 4, 8))),
}

# Fewer output elements than this cannot fill the GPU with wide tiles (132 SMs, two waves of 128 x 256).
WIDE_TILE_MIN_OUTPUTS = 132 * 128 * 256 * 2


def tile_case(dtype: torch.dtype, r_pad: int) -> str:
    """The row of TILE_TABLE for this dtype and padded rank."""
    if r_pad >= 128:
        return "rank >= 128"
    if dtype == torch.float32:
        return "float32"
    return "rank 64" if r_pad >= 64 else "half"


def forward_pool(dtype: torch.dtype, r_pad: int) -> list[Tile]:
    """The forward's tiles for this case, the heuristic's preferred one first."""
    return list(TILE_TABLE[tile_case(dtype, r_pad)][0])


def backward_pool(dtype: torch.dtype, r_pad: int, has_dropout: bool) -> list[Tile]:
    """The backward's tiles for this case; with dropout none wider than 128 x 128 (the dropout epilogue
    holds a second float32 tile in registers, which spills heavily at 128 x 256)."""
    return [tile for tile in TILE_TABLE[tile_case(dtype, r_pad)][1] if not (has_dropout and tile.wide)]


def _first_narrow(tiles: Sequence[Tile]) -> Tile:
    return next(tile for tile in tiles if not tile.wide)


def forward_tile(n_rows: int, d_out: int, r_pad: int, dtype: torch.dtype) -> Tile:
    """The forward's tile without tuning: the first of its case, but in half precision below rank 64
    the first narrow one for problems too small to fill the GPU with wide tiles."""
    if runtime.interpreting():
        return INTERPRETER_TILE
    tiles = forward_pool(dtype, r_pad)
    if tile_case(dtype, r_pad) == "half" and n_rows * d_out < WIDE_TILE_MIN_OUTPUTS:
        return _first_narrow(tiles)
    return tiles[0]


def backward_tile(n_rows: int, d_in: int, r_pad: int, dtype: torch.dtype, has_dropout: bool) -> Tile:
    """The backward's tile without tuning: the first of its case (backward_pool), the first narrow one
    for problems too small to fill the GPU with wide tiles."""
    if runtime.interpreting():
        return INTERPRETER_TILE
    tiles = backward_pool(dtype, r_pad, has_dropout)
    return _first_narrow(tiles) if n_rows * d_in < WIDE_TILE_MIN_OUTPUTS else tiles[0]


# ==================================================================================================
# launch configurations
# ==================================================================================================


@dataclass(frozen=True)
class ForwardConfig:
    """How `condlora_forward_launch` runs. Passed as its `config=`, it fixes the launch (nothing is
    tuned); a field left None takes the heuristic's choice.

    tile     the output tile and its pipeline (None: forward_tile)
    use_tma  True: TMA main loop wherever the tensors allow it (Hopper or newer, aligned rows, eager);
             False: the pointer main loop; None: TMA only above TMA_MIN_MACS multiply-adds
    """

    tile: Optional[Tile] = None
    use_tma: Optional[bool] = None

    def as_dict(self) -> dict:
        """As the autotuner's cache file stores a candidate (which sets only the tile)."""
        return self.tile.meta()

    def __str__(self) -> str:
        return str(self.tile)


@dataclass(frozen=True)
class BackwardConfig:
    """How `condlora_backward_launch` runs. Passed as its `config=`, it fixes the launch (nothing is
    tuned); a field left None takes the heuristic's choice.

    tile          the DX tiles' tile and pipeline (None: backward_tile)
    num_helpers   programs doing the rank-r row work (None: num_helpers' rate model, times helper_scale)
    helper_scale  factor on the rate model's helper count (the autotuner's variants)
    max_slots     at most this many partial-sum slots, which row blocks then share in turns (None: as
                  many as memory allows, up to one per row block)
    lookahead     groups of row blocks the helpers may run ahead of the workers
    use_tma       as ForwardConfig.use_tma, for the DX main loop
    """

    tile: Optional[Tile] = None
    num_helpers: Optional[int] = None
    helper_scale: float = 1.0
    max_slots: Optional[int] = None
    lookahead: int = LOOKAHEAD_GROUPS
    use_tma: Optional[bool] = None

    def as_dict(self) -> dict:
        """As the autotuner's cache file stores a candidate (which sets the tile and helper_scale)."""
        return dict(self.tile.meta(), HELPER_SCALE=self.helper_scale)

    def __str__(self) -> str:
        return f"{self.tile} h*{self.helper_scale:g}"


# ==================================================================================================
# the autotuner's candidates
# ==================================================================================================

MAX_CANDIDATES = 5
HELPER_SCALES = (0.5, 1.5)  # the backward's helper-count variants, around the heuristic's count


def smem_lower_bound(tile: Tile, elem_size: int, helper_loop_sizes: dict) -> int:
    """Shared memory a tile takes at least: the larger of the main loop's pipeline and the helper
    loop's (x rows of the U and V tiles, BLOCK_M x HELPER_BLOCK_K), each at num_stages - 1 buffers
    (Triton 3.6-3.8 keep num_stages - 1 on sm_80, num_stages on sm_90). A lower bound: a candidate above
    the GPU's limit cannot fit; one below may still not, and the launch then retries with fewer stages
    (or the race drops it)."""
    main = max(1, tile.num_stages - 1) * (tile.block_m + tile.block_n) * tile.block_k
    helper = max(1, helper_loop_sizes["HELPER_STAGES"] - 1) * tile.block_m * helper_loop_sizes["HELPER_BLOCK_K"]
    return max(main, helper) * elem_size


def shortlist(first: Sequence, pool: Sequence, dtype: torch.dtype, helper_loop_sizes: dict,
              smem_limit: int) -> list:
    """`first` (configurations with a tile: the heuristic first, kept whatever its size, since it is what
    runs without tuning), then the `pool` entries not yet listed that can fit, up to MAX_CANDIDATES."""
    elem_size = torch.empty(0, dtype=dtype).element_size()
    chosen = list(first)
    for cfg in pool:
        if len(chosen) >= MAX_CANDIDATES:
            break
        if cfg not in chosen and smem_lower_bound(cfg.tile, elem_size, helper_loop_sizes) <= smem_limit:
            chosen.append(cfg)
    return chosen


def forward_candidates(heuristic: ForwardConfig, dtype: torch.dtype, r_pad: int, helper_loop_sizes: dict,
                       smem_limit: int) -> list[ForwardConfig]:
    """The forward's race: the heuristic first, then the other tiles of its case."""
    pool = [ForwardConfig(tile) for tile in forward_pool(dtype, r_pad)]
    return shortlist([heuristic], pool, dtype, helper_loop_sizes, smem_limit)


def backward_candidates(heuristic: BackwardConfig, dtype: torch.dtype, r_pad: int, has_dropout: bool,
                        helper_loop_sizes: dict, smem_limit: int,
                        helpers_at: Callable[[BackwardConfig], int]) -> list[BackwardConfig]:
    """The backward's race: the heuristic tile with the heuristic helper count, then the same tile with
    HELPER_SCALES times as many helpers (where the count differs: it is bounded by the row blocks and
    the programs), then other tiles with the heuristic's count. `helpers_at(cfg)` is the helper count
    a configuration launches with."""
    first, counts = [heuristic], {helpers_at(heuristic)}
    for scale in HELPER_SCALES:
        variant = BackwardConfig(heuristic.tile, helper_scale=scale)
        if helpers_at(variant) not in counts:  # helper count is a runtime argument: no extra compile
            counts.add(helpers_at(variant))
            first.append(variant)
    pool = [BackwardConfig(tile) for tile in backward_pool(dtype, r_pad, has_dropout)]
    return shortlist(first, pool, dtype, helper_loop_sizes, smem_limit)


# ==================================================================================================
# sizes
# ==================================================================================================


def r_pad(rank: int) -> int:
    """The rank padded for tl.dot: a power of two, 16 at least."""
    return max(16, triton.next_power_of_2(rank))


def helper_loop(dtype: torch.dtype, r_pad: int) -> dict:
    """Chunk width and pipeline depth of the streaming loops over rows of x and dy (U, V, the dA
    partials): 128 columns, 4 stages in flight, ~32 KiB each for bf16, so that one SM reading a row
    block alone keeps enough bytes in flight; 64 columns and 2 stages for float32 and ranks of 64 and
    more, whose operands need the shared memory."""
    if runtime.interpreting():
        return dict(HELPER_BLOCK_K=32, HELPER_STAGES=1)
    if dtype == torch.float32 or r_pad >= 64:
        return dict(HELPER_BLOCK_K=64, HELPER_STAGES=2)
    return dict(HELPER_BLOCK_K=128, HELPER_STAGES=4)


def side_block() -> int:
    """Rows or columns per tile of the work outside the main GEMM: the forward's GEN tiles, the
    backward's RED and DTHETA tiles."""
    return 32 if runtime.interpreting() else 64


def num_programs(device: torch.device, work_items: int) -> int:
    """One program per SM at most, so that all are resident at once (the flags rely on it); 1 when
    interpreting, where programs run one after another."""
    if runtime.interpreting() or device.type != "cuda":
        return 1
    return max(1, min(work_items, runtime.sm_count(device)))


def num_helpers(num_programs: int, helper_bytes: float, worker_flops: float, num_m: int, min_helpers: int,
                scale: float = 1.0, requested: Optional[int] = None) -> int:
    """How many programs do the backward's rank-r row work while the others multiply: enough that the
    helpers' share of the time matches their share of the work, with a margin of 1.5 so that they stay
    ahead, and at least `min_helpers` so the first group's rows are ready when the first output tiles
    are. `scale` multiplies that count (the autotuner's variants) within the same bounds: one helper at
    least, no more than the row blocks, and a quarter of the programs at most, so that workers remain
    for the DX tiles the helpers wait on. `requested` (BackwardConfig.num_helpers) replaces the count,
    leaving one worker at least."""
    if num_programs == 1:
        return 1
    if requested is not None:
        return max(1, min(requested, num_programs - 1))
    t_helper = helper_bytes / HELPER_BYTES_PER_S
    t_worker = worker_flops / WORKER_FLOPS_PER_S
    wanted = math.ceil(1.5 * num_programs * t_helper / max(t_helper + t_worker, 1e-30))
    most = min(num_m, num_programs // 4 if num_programs >= 8 else 1)
    helpers = max(1, min(max(wanted, min_helpers), most))
    return helpers if scale == 1.0 else max(1, min(round(helpers * scale), most))


def num_slots(n_rows: int, num_m: int, d_in: int, d_out: int, r_pad: int, elem_size: int,
              max_slots: Optional[int] = None) -> int:
    """Partial-sum slots of the backward: one per row block, each written once (no read-back, no turns:
    the helpers just store), while the float32 workspace stays within the size of one activation
    gradient (N * max(d_in, d_out) elements of the input dtype, 32 MiB at least); fewer, shared in
    turns, beyond that or beyond `max_slots`."""
    per_slot = r_pad * (d_in + d_out + 1) * 4
    budget = max(32 << 20, n_rows * max(d_in, d_out) * elem_size)
    slots = min(num_m, max(1, budget // per_slot))
    return max(1, min(slots, max_slots) if max_slots else slots)


def dot_precisions(dtype: torch.dtype) -> tuple[str, str]:
    """(precision of dots on input-dtype operands, of dots on float32 accumulators): tf32 only where
    torch allows it for float32 matmuls."""
    tf32_ok = torch.backends.cuda.matmul.allow_tf32
    input_precision = "tf32" if (dtype != torch.float32 or tf32_ok) else "ieee"
    f32_precision = "tf32" if (dtype in (torch.float16, torch.bfloat16) or tf32_ok) else "ieee"
    return input_precision, f32_precision


def use_tma(macs: int, *tensors: torch.Tensor, requested: Optional[bool] = None) -> bool:
    """TMA main loops in eager mode where the tensors allow them: for problems large enough to hide the
    descriptors' host cost (`requested` None), always (True) or never (False). Traced by torch.compile,
    a triton_op's host-side tensor descriptors keep the fake tensor they were built from and the
    compiled graph cannot run them (torch 2.11: "Cannot access data pointer of Tensor"), so traced
    graphs take the pointer main loop."""
    wanted = macs >= TMA_MIN_MACS if requested is None else requested
    return wanted and not runtime.tracing(tensors[0]) and runtime.tma_ready(*tensors)


# ==================================================================================================
# the kernels' constexpr arguments
# ==================================================================================================


def forward_switches(*, paper_mode: bool, has_bias: bool, has_dropout: bool, use_tma: bool,
                     dtype: torch.dtype) -> dict:
    """The forward kernel's constexpr switches: they change the compiled code (and the tuning key)."""
    return dict(MODE_PAPER=paper_mode, HAS_BIAS=has_bias, HAS_DROPOUT=has_dropout, USE_TMA=use_tma,
                DOT_PRECISION=dot_precisions(dtype)[0])


def backward_switches(*, paper_mode: bool, has_dropout: bool, use_tma: bool, need_dx: bool, need_dtheta: bool,
                      need_dbias: bool, dtype: torch.dtype) -> dict:
    """The backward kernel's constexpr switches: they change the compiled code (and the tuning key)."""
    dot_precision, f32_precision = dot_precisions(dtype)
    return dict(MODE_PAPER=paper_mode, HAS_DROPOUT=has_dropout, USE_TMA=use_tma, NEED_DX=need_dx,
                NEED_DTHETA=need_dtheta, NEED_DBIAS=need_dbias, DOT_PRECISION=dot_precision,
                F32_DOT_PRECISION=f32_precision)


def forward_meta(tile: Tile, switches: dict, dtype: torch.dtype, r_pad: int) -> dict:
    """Every constexpr argument of the forward kernel, and the launch options num_warps, num_stages."""
    return dict(switches, **tile.meta(), GEN_BLOCK=side_block(), R_PAD=r_pad, SPLIT_ACC=dtype == torch.float32,
                FLAG_BLOCK=FLAG_BLOCK, **helper_loop(dtype, r_pad))


def backward_meta(tile: Tile, switches: dict, dtype: torch.dtype, r_pad: int) -> dict:
    """Every constexpr argument of the backward kernel, and the launch options num_warps, num_stages."""
    return dict(switches, **tile.meta(), RED_BLOCK=side_block(), DT_BLOCK=side_block(), R_PAD=r_pad,
                SPLIT_ACC=dtype == torch.float32, FLATTEN=FLATTEN, FLAG_BLOCK=FLAG_BLOCK, **helper_loop(dtype, r_pad))
