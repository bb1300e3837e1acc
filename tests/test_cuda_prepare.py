"""`condlora_C::prepare` on the GPU: the generation kernels of csrc/cuda/kernels.cu against the float64 reference.

Which kernel takes a layer (csrc/cuda/cuda_ops.cpp, prepare_cuda):
  - paper mode with a small theta (2r <= 32, 2r * d <= 24576), outside CUDA graphs: one block per row of W0;
  - every other half-precision layer with 2r (paper) or r (general) <= 32 and d_in a multiple of 8, inside CUDA
    graphs too: the tiled tensor-core pass; a W0 already in half precision (nothing to round) only up to 2^20
    elements, above which cuBLAS reads it faster;
  - the rest (float32 and float64 layers, larger ranks): the cast and cuBLAS.
Each case checks which kernel ran (its name in the profiler), A and B against float64 with the 2x same-dtype rule
(condlora_kernels/testing.py), the rounded weight bit for bit, and that a second call gives the same bits. The
shapes cover ragged tiles (sizes not multiples of 64), several row blocks and column strips (partial sums), and
the Llama shapes the tiled pass was written for.
"""

import re

import pytest
import torch

from condlora_kernels import reference
from condlora_kernels.kernels import cpp
from condlora_kernels.testing import check_close
from condlora_kernels.timing import capture_cuda_graph

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and cpp.LOAD_ERROR is None and cpp.WITH_CUDA),
    reason="needs a GPU and the extension's CUDA kernels")

ROW_KERNEL = re.compile(r"(?<!tiled_)prepare_kernel")
TILED_KERNEL = re.compile(r"tiled_prepare_kernel")


def prepare(weight, theta_a, theta_b, dtype, mode):
    return torch.ops.condlora_C.prepare.default(weight, theta_a, theta_b, dtype, mode)


def kernel_names(fn):
    """(fn's result, the names of the CUDA kernels it launched)."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        out = fn()
        torch.cuda.synchronize()
    return out, [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def make_inputs(mode, d_in, d_out, r, weight_dtype, theta_dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to("cuda")

    weight = rnd(d_out, d_in, scale=d_in ** -0.5).to(weight_dtype)
    theta_a = rnd(*reference.theta_a_shape(r, d_out, d_in, mode), scale=1.0).to(theta_dtype)
    theta_b = rnd(r, d_in, scale=1.0).to(theta_dtype)
    return weight, theta_a, theta_b


def poison_allocator(*shapes, dtype):
    """Fill freed blocks of the caching allocator with NaN: outputs allocated next (at::empty) reuse them, so an
    element the kernel leaves unwritten reads NaN instead of a previous call's nearly equal value."""
    junk = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape in shapes]
    del junk


def check_elementwise(outputs, weight, theta_a, theta_b, dtype, mode):
    """Every element of A and B against float64 from the same rounded inputs (what the tiled pass multiplies), within
    a bound that holds for any order of float32 sums: the output's rounding (eps(dtype) |exact|) plus n eps(float32)
    times the sum of the products' magnitudes. A wrong index or a lost tile breaks it where a norm would not."""
    rounded = [t.to(dtype).double() for t in (weight, theta_a, theta_b)]
    exact = reference.generate_lora_weights(*rounded, mode)
    magnitudes = reference.generate_lora_weights(*(t.abs() for t in rounded), mode)
    n = max(weight.shape) if mode == "general" else weight.shape[1]  # the longest reduction: over d_out for A
    for name, out, ex, mag in zip(("lora_a", "lora_b"), outputs[1:], exact, magnitudes):
        bound = torch.finfo(dtype).eps * ex.abs() + n * torch.finfo(torch.float32).eps * mag
        worst = ((out.double() - ex).abs() - bound).max().item()
        assert worst <= 0, f"{name}: an element is {worst:.3e} beyond its bound"


def check_generation(outputs, weight, theta_a, theta_b, dtype, mode):
    weight_out, lora_a, lora_b = outputs
    if weight.dtype == dtype:
        assert weight_out.numel() == 0  # no cast: the op hands back an empty tensor
    else:
        assert torch.equal(weight_out, weight.to(dtype)), "the rounded weight differs from W0.to(dtype)"
    exact = reference.generate_lora_weights(weight.double(), theta_a.double(), theta_b.double(), mode)
    same_dtype = reference.generate_lora_weights(weight.to(dtype), theta_a.to(dtype), theta_b.to(dtype), mode)
    for name, out, r64, base in zip(("lora_a", "lora_b"), (lora_a, lora_b), exact, same_dtype):
        assert out.dtype == dtype and out.shape == r64.shape, name
        ok, msg = check_close(out, r64, base, name)
        assert ok, msg


# (mode, d_in, d_out, r, the kernel expected in eager for a float32 master; expected_kernel: a half-precision W0)
CASES = [
    ("paper", 1000, 1000, 12, "row"),      # 2r * d = 24000: the row kernel's largest theta
    ("paper", 2000, 2000, 16, "tiled"),    # ragged last tile, several row blocks and strips
    ("paper", 4096, 4096, 16, "tiled"),    # Llama's attention projections
    ("paper", 2048, 2048, 8, "tiled"),     # 2r = 16: the paper-mode instantiation with 16 columns of R
    ("paper", 1000, 1000, 17, "cublas"),   # 2r = 34 > 32
    ("general", 296, 70, 5, "tiled"),      # fewer rows than one row block, ragged tiles
    ("general", 300, 70, 5, "cublas"),     # d_in not a multiple of 8: rows of whole 16-byte copies only
    ("general", 1000, 1500, 16, "tiled"),  # six row blocks (partial sums of A), strips (partial sums of B)
    ("general", 40, 17, 32, "tiled"),      # r = 32, one ragged tile
    ("general", 4096, 11008, 16, "tiled"), # Llama's gate and up projections
    ("general", 11008, 4096, 16, "tiled"), # and its down projection
    ("general", 64, 64, 33, "cublas"),     # r > 32
    ("general", 1024, 1024, 8, "tiled"),   # 2^20 elements: the largest half-precision W0 the tiled pass takes
    ("general", 1024, 1032, 8, "tiled"),   # one row block more: a half-precision W0 takes cuBLAS
]
MAX_UNROUNDED_TILED_ELEMENTS = 1 << 20  # csrc/cuda/cuda_ops.cpp, kMaxUnroundedTiledElements


def expected_kernel(expected: str, weight_dtype: torch.dtype, dtype: torch.dtype, d_in: int, d_out: int) -> str:
    """The kernel of CASES for a float32 master; a W0 already in the layer's dtype leaves large layers to cuBLAS."""
    if expected == "tiled" and weight_dtype == dtype and d_in * d_out > MAX_UNROUNDED_TILED_ELEMENTS:
        return "cublas"
    return expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masters", ["float32 masters", "half weight", "half weight and theta"])
@pytest.mark.parametrize("mode,d_in,d_out,r,expected", CASES)
def test_generation_matches_reference(mode, d_in, d_out, r, expected, masters, dtype):
    weight_dtype = torch.float32 if masters == "float32 masters" else dtype
    theta_dtype = dtype if masters == "half weight and theta" else torch.float32
    expected = expected_kernel(expected, weight_dtype, dtype, d_in, d_out)
    weight, theta_a, theta_b = make_inputs(mode, d_in, d_out, r, weight_dtype, theta_dtype, seed=d_in + d_out + r)
    poison_allocator((d_out, d_in), (r, d_in), (d_out, r), dtype=dtype)
    outputs, names = kernel_names(lambda: prepare(weight, theta_a, theta_b, dtype, mode))
    ran_row = any(ROW_KERNEL.search(n) for n in names)
    ran_tiled = any(TILED_KERNEL.search(n) for n in names)
    assert (ran_row, ran_tiled) == (expected == "row", expected == "tiled"), names
    check_generation(outputs, weight, theta_a, theta_b, dtype, mode)
    if expected == "tiled":
        check_elementwise(outputs, weight, theta_a, theta_b, dtype, mode)
    poison_allocator((d_out, d_in), (r, d_in), (d_out, r), dtype=dtype)
    again = prepare(weight, theta_a, theta_b, dtype, mode)
    for first, second in zip(outputs, again):
        assert torch.equal(first, second), "two calls gave different bits"


@pytest.mark.parametrize("mode,d_in,d_out,r", [("paper", 768, 768, 8), ("general", 200, 130, 4)])
def test_inside_a_cuda_graph_the_tiled_kernel_matches_reference(mode, d_in, d_out, r):
    """Inside a capture the row kernel steps aside (cuda_ops.cpp) and the tiled pass takes its layers; outside, the
    row kernel (paper) or the tiled pass (general): both against the reference."""
    dtype = torch.bfloat16
    weight, theta_a, theta_b = make_inputs(mode, d_in, d_out, r, torch.float32, torch.float32, seed=r)
    graph, eager, captured = capture_cuda_graph(lambda: prepare(weight, theta_a, theta_b, dtype, mode), warmup=1)
    graph.replay()
    torch.cuda.synchronize()
    for outputs in (eager, captured):
        check_generation(outputs, weight, theta_a, theta_b, dtype, mode)
    if mode == "general":  # the same kernel in both: the same bits
        for first, second in zip(eager, captured):
            assert torch.equal(first, second)


def test_misaligned_inputs_take_cublas():
    """The tiled pass copies 16 bytes at a time: W0 that starts 4 bytes into its storage takes cuBLAS, correctly."""
    weight, theta_a, theta_b = make_inputs("general", 256, 256, 4, torch.float32, torch.float32, seed=2)
    shifted = torch.empty(weight.numel() + 1, device="cuda")[1:].view(weight.shape).copy_(weight)
    outputs, names = kernel_names(lambda: prepare(shifted, theta_a, theta_b, torch.bfloat16, "general"))
    assert not any(TILED_KERNEL.search(n) for n in names), names
    check_generation(outputs, shifted, theta_a, theta_b, torch.bfloat16, "general")


def test_float32_layers_keep_cublas():
    """The tiled pass multiplies 16-bit values: float32 layers keep cuBLAS's float32 products."""
    weight, theta_a, theta_b = make_inputs("general", 300, 200, 4, torch.float32, torch.float32, seed=1)
    outputs, names = kernel_names(lambda: prepare(weight, theta_a, theta_b, torch.float32, "general"))
    assert not any(TILED_KERNEL.search(n) for n in names), names
    check_generation(outputs, weight, theta_a, theta_b, torch.float32, "general")


@pytest.mark.parametrize("mode,d,r,expected", [("general", 256, 4, "tiled"), ("paper", 2048, 8, "cublas")])
def test_theta_a_alignment_is_asked_only_where_it_is_copied(mode, d, r, expected):
    """The tiled pass copies theta_a 16 bytes at a time in paper mode (it is part of theta_r) and reads it element by
    element in general mode: theta_a starting 4 bytes into its storage keeps the pass in general mode only. Outside
    CUDA graphs the paper shape is one the row kernel leaves to the tiled pass (2r * d > 24576)."""
    weight, theta_a, theta_b = make_inputs(mode, d, d, r, torch.float32, torch.float32, seed=3)
    shifted = torch.empty(theta_a.numel() + 1, device="cuda")[1:].view(theta_a.shape).copy_(theta_a)
    assert shifted.data_ptr() % 16 != 0
    outputs, names = kernel_names(lambda: prepare(weight, shifted, theta_b, torch.bfloat16, mode))
    assert any(TILED_KERNEL.search(n) for n in names) == (expected == "tiled"), names
    assert not any(ROW_KERNEL.search(n) for n in names), names
    check_generation(outputs, weight, shifted, theta_b, torch.bfloat16, mode)
    if expected == "tiled":
        check_elementwise(outputs, weight, shifted, theta_b, torch.bfloat16, mode)


@pytest.mark.parametrize("d_out,expected", [(65535 * 64 + 64, "tiled"), (65535 * 256 + 1, "cublas")])
def test_general_mode_row_blocks_are_bounded_by_its_own_block_height(d_out, expected):
    """Row blocks are gridDim.y (at most 65535). General mode's blocks are 256 rows tall, paper mode's 64: a general
    layer of more than 65535 * 64 rows still takes the pass, one of more than 65535 * 256 rows takes cuBLAS."""
    weight, theta_a, theta_b = make_inputs("general", 8, d_out, 1, torch.float32, torch.float32, seed=4)
    outputs, names = kernel_names(lambda: prepare(weight, theta_a, theta_b, torch.bfloat16, "general"))
    assert any(TILED_KERNEL.search(n) for n in names) == (expected == "tiled"), names
    check_generation(outputs, weight, theta_a, theta_b, torch.bfloat16, "general")
    if expected == "tiled":
        check_elementwise(outputs, weight, theta_a, theta_b, torch.bfloat16, "general")
