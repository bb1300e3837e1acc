"""Autotuning of the Triton kernels' launch configurations (condlora_kernels/kernels/triton/autotune.py).

CPU tests check the logic with fake launches and a fake timer (no GPU, no interpreter needed): the key,
the candidate lists (config.py), the race, the JSON cache, the conditions that turn measuring off. GPU tests run
the kernels with tuning on against the reference (the accuracy rule of condlora_kernels.testing), and
every candidate configuration, forced one at a time, at one odd shape: that is what makes a race safe,
since whichever candidate wins serves the call.

tests/conftest.py turns tuning off for the other test files; this file turns it on, with a cache
directory of its own per test.
"""

import json
import logging
import os
import warnings

import pytest
import torch
import triton

from condlora_kernels import condlora_linear
from condlora_kernels.kernels.triton import autotune, config
from condlora_kernels.kernels.triton import condlora_linear as tk
from condlora_kernels.kernels.triton.config import BackwardConfig, ForwardConfig, Tile
from condlora_kernels.ops.backends import BACKENDS
from condlora_kernels.testing import backend_vs_reference, make_problem
from tests.conftest import requires_cuda

A100_SMEM = 166912  # opt-in shared memory per block, bytes
H100_SMEM = 232448
HALF = (torch.float16, torch.bfloat16)
HELPER_LOOP = dict(HELPER_BLOCK_K=128, HELPER_STAGES=4)  # config.helper_loop's below rank 64, in half precision


@pytest.fixture(autouse=True)
def tuning_on(monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.ENV_SWITCH, "1")
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path / "cache"))
    autotune.clear_cache()
    yield
    autotune.clear_cache()


@pytest.fixture
def measurable(monkeypatch):
    """Make a CPU machine look like one that may measure: no interpreter, no graph capture."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)


@pytest.fixture
def heuristics(monkeypatch):
    """The launchers' GPU heuristics, also where the interpreter is on (it would answer INTERPRETER_TILE).
    The kernels were compiled for the interpreter at import: that stays as it is."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


# ---------------------------------------------------------------------------------------------------
# key
# ---------------------------------------------------------------------------------------------------


def test_rows_bucket_is_next_power_of_two():
    assert [autotune.rows_bucket(n) for n in (0, 1, 2, 3, 600, 1000, 1024, 1025, 8192)] == \
        [1, 1, 2, 4, 1024, 1024, 1024, 2048, 8192]


def test_key_groups_lengths_of_one_octave_and_separates_switches():
    def key(n_rows, **switches):
        switches = {"MODE_PAPER": True, "HAS_DROPOUT": False, **switches}
        return autotune.make_key("condlora_fwd", torch.device("cpu"), torch.bfloat16, 16, 768, 1000, n_rows, **switches)

    assert key(600) == key(1000) == key(1024)
    assert key(1025) != key(1024)
    assert key(1000, HAS_DROPOUT=True) != key(1000)
    assert key(1000, MODE_PAPER=False) != key(1000)
    text = autotune.key_string(key(1000))
    assert text == "condlora_fwd|cpu|bfloat16|16|768|1000|1024|MODE_PAPER=True|HAS_DROPOUT=False"


# ---------------------------------------------------------------------------------------------------
# candidates
# ---------------------------------------------------------------------------------------------------

CASES = [(dtype, r_pad, n_rows) for dtype in (torch.bfloat16, torch.float16, torch.float32)
         for r_pad in (16, 32, 64, 128, 256) for n_rows in (512, 65536)]


def _area(tile):
    return tile.block_m * tile.block_n


def _check_rules(tile, dtype, r_pad, backward_dropout=False):
    """The rank and dtype rules the heuristics encode, stated independently of config.py."""
    if dtype == torch.float32 and r_pad < 128:
        assert tile.block_k == 32 and _area(tile) <= 128 * 128, tile
    if r_pad >= 128:  # rank-r operands take shared memory: small tiles, short pipelines
        assert _area(tile) <= 128 * 128 and tile.num_stages * tile.block_k <= 128, tile
    if r_pad >= 64 and dtype in HALF and _area(tile) > 128 * 128:
        assert tile.num_stages <= 2, tile
    if backward_dropout:  # a dropout epilogue's second float32 tile spills above 128 x 128
        assert _area(tile) <= 128 * 128, tile


@pytest.mark.parametrize("smem_limit", [A100_SMEM, H100_SMEM], ids=["a100", "h100"])
@pytest.mark.parametrize("dtype,r_pad,n_rows", CASES, ids=str)
def test_forward_candidates(dtype, r_pad, n_rows, smem_limit, heuristics):
    heuristic = ForwardConfig(config.forward_tile(n_rows, 4096, r_pad, dtype))
    helper_loop = config.helper_loop(dtype, r_pad)
    cands = config.forward_candidates(heuristic, dtype, r_pad, helper_loop, smem_limit)
    assert cands[0] == heuristic
    assert 1 <= len(cands) <= config.MAX_CANDIDATES
    assert len(set(cands)) == len(cands)
    elem = torch.empty(0, dtype=dtype).element_size()
    for cfg in cands:
        _check_rules(cfg.tile, dtype, r_pad)
    for cfg in cands[1:]:
        assert config.smem_lower_bound(cfg.tile, elem, helper_loop) <= smem_limit
    # every candidate comes from the pool, so that test_gpu_every_candidate_is_correct covers them all
    assert all(c.tile in config.forward_pool(dtype, r_pad) for c in cands)


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("smem_limit", [A100_SMEM, H100_SMEM], ids=["a100", "h100"])
@pytest.mark.parametrize("dtype,r_pad,n_rows", CASES, ids=str)
def test_backward_candidates(dtype, r_pad, n_rows, smem_limit, dropout, heuristics):
    heuristic_tile = config.backward_tile(n_rows, 4096, r_pad, dtype, dropout)

    def helpers_at(cfg):  # as the launcher would count them: 16 by the heuristic, at most 33
        return max(1, min(round(16 * cfg.helper_scale), 33))

    helper_loop = config.helper_loop(dtype, r_pad)
    cands = config.backward_candidates(BackwardConfig(heuristic_tile), dtype, r_pad, dropout, helper_loop, smem_limit,
                                       helpers_at)
    assert cands[0] == BackwardConfig(heuristic_tile, helper_scale=1.0)
    assert 1 <= len(cands) <= config.MAX_CANDIDATES
    assert len(set(cands)) == len(cands)
    scales = {c.helper_scale for c in cands if c.tile == heuristic_tile}
    assert scales == {0.5, 1.0, 1.5}  # 8, 16, 24 helpers
    elem = torch.empty(0, dtype=dtype).element_size()
    for cfg in cands:
        _check_rules(cfg.tile, dtype, r_pad, backward_dropout=dropout)
        assert cfg.helper_scale == 1.0 or cfg.tile == heuristic_tile
        assert cfg.tile in config.backward_pool(dtype, r_pad, dropout)
        if cfg.tile != heuristic_tile:
            assert config.smem_lower_bound(cfg.tile, elem, helper_loop) <= smem_limit


def test_backward_helper_variants_that_change_nothing_are_dropped():
    heuristic = BackwardConfig(Tile(128, 128, 64, 3, 8))
    cands = config.backward_candidates(heuristic, torch.bfloat16, 16, False, HELPER_LOOP, H100_SMEM, lambda cfg: 1)
    assert [c.helper_scale for c in cands] == [1.0] * len(cands)
    assert len(cands) == config.MAX_CANDIDATES


@pytest.mark.parametrize("scale", [0.5, 1.0, 1.5, 4.0])
@pytest.mark.parametrize("num_programs,num_m", [(132, 200), (132, 3), (16, 64), (6, 64), (1, 10)])
def test_scaled_helper_counts_stay_within_bounds(num_programs, num_m, scale):
    """At least one helper, no more than the row blocks, and workers left for the DX tiles."""
    helpers = config.num_helpers(num_programs, 1e9, 1e12, num_m, min_helpers=8, scale=scale)
    assert 1 <= helpers <= max(1, min(num_m, num_programs // 4))
    if scale == 1.0:
        assert helpers == config.num_helpers(num_programs, 1e9, 1e12, num_m, min_helpers=8)


@pytest.mark.parametrize("requested,num_programs,expected", [(12, 132, 12), (500, 132, 131), (0, 132, 1), (12, 1, 1)])
def test_requested_helper_count_leaves_a_worker(requested, num_programs, expected):
    """BackwardConfig.num_helpers replaces the rate model's count, but one program stays a worker."""
    assert config.num_helpers(num_programs, 1e9, 1e12, 200, min_helpers=8, requested=requested) == expected


def test_smem_pruning_drops_only_what_cannot_fit():
    deep = ForwardConfig(Tile(128, 256, 64, 5, 8))  # 4 x 48 KiB of main-loop pipeline at least
    assert config.smem_lower_bound(deep.tile, 2, HELPER_LOOP) > A100_SMEM
    heuristic = ForwardConfig(Tile(128, 128, 64, 3, 8))
    assert config.shortlist([heuristic], [deep], torch.bfloat16, HELPER_LOOP, A100_SMEM) == [heuristic]
    assert config.shortlist([heuristic], [deep], torch.bfloat16, HELPER_LOOP, 4 * A100_SMEM) == [heuristic, deep]


def test_a100_list_leaves_out_the_256_row_backward_tile(heuristics):
    """Its helper loop (3 x 256 rows x 128 columns of bf16 at least) fits the H100 but not the A100."""
    tall = BackwardConfig(Tile(256, 128, 64, 3, 8))
    heuristic = BackwardConfig(config.backward_tile(65536, 4096, 16, torch.bfloat16, False))
    lists = {limit: config.backward_candidates(heuristic, torch.bfloat16, 16, False, HELPER_LOOP, limit,
                                               lambda cfg: 1)
             for limit in (A100_SMEM, H100_SMEM)}
    assert tall in lists[H100_SMEM] and tall not in lists[A100_SMEM]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("r_pad", [16, 32, 64, 128, 256])
def test_heuristic_tiles_come_from_the_table(dtype, r_pad, heuristics):
    """The heuristics pick from the same tile table the races draw from: the first tile of the case,
    a narrow one where the problem is too small for wide tiles (and for the backward's dropout)."""
    for n_rows in (512, 65536):
        for dropout in (False, True):
            tile = config.backward_tile(n_rows, 4096, r_pad, dtype, dropout)
            assert tile == config.backward_pool(dtype, r_pad, dropout)[0] or not tile.wide
            assert not (dropout and tile.wide)
        tile = config.forward_tile(n_rows, 4096, r_pad, dtype)
        assert tile == config.forward_pool(dtype, r_pad)[0] or not tile.wide
    assert config.forward_tile(65536, 4096, r_pad, dtype) == config.forward_pool(dtype, r_pad)[0]


# ---------------------------------------------------------------------------------------------------
# the race, with fake launches and a fake timer
# ---------------------------------------------------------------------------------------------------

CANDIDATES = [ForwardConfig(Tile(128, 128, 64, 3, 8)), ForwardConfig(Tile(128, 256, 64, 3, 8)),
              ForwardConfig(Tile(256, 128, 64, 3, 8)), ForwardConfig(Tile(128, 128, 32, 4, 4))]
KEY = ("condlora_fwd", "fake GPU sm90 132SMs", "bfloat16", 16, 768, 1000, 1024, ("MODE_PAPER", False))


class FakeKernel:
    """Stands in for a launcher's `run` and for the timer: records launches, times them by a table."""

    def __init__(self, times_ms, fail=()):
        self.times_ms, self.fail, self.launches, self.timed = times_ms, fail, [], 0

    def run(self, cfg, quiet=False):
        if CANDIDATES.index(cfg) in self.fail:
            raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
        self.launches.append(CANDIDATES.index(cfg))

    def timer(self, launch):
        self.timed += 1
        before = len(self.launches)
        launch()
        return self.times_ms[self.launches[before]]


def no_timer(launch):
    raise AssertionError("nothing may be timed here")


def tuned(fake, key=KEY, candidates=CANDIDATES, timer=None, **where):
    where = {"device_type": "cuda", "tracing": False, "n_rows": 1000, **where}
    return autotune.run_tuned(key, candidates[0], lambda: candidates, fake.run, timer=timer or fake.timer, **where)


def test_race_picks_the_fastest_and_runs_it_last(measurable):
    fake = FakeKernel([3.0, 1.0, 2.0, 1.5])
    assert tuned(fake) == CANDIDATES[1]
    assert fake.launches == [0, 1, 2, 3, 1]  # the winner last: its outputs are the call's
    assert fake.timed == 4
    assert autotune.cache_info()["chosen"] == {autotune.key_string(KEY): CANDIDATES[1].as_dict()}


def test_winner_that_ran_last_is_not_run_again(measurable):
    fake = FakeKernel([3.0, 2.0, 2.0, 1.0])
    assert tuned(fake) == CANDIDATES[3]
    assert fake.launches == [0, 1, 2, 3]


def test_second_call_uses_the_choice_without_timing(measurable):
    tuned(FakeKernel([3.0, 1.0, 2.0, 1.5]))
    fake = FakeKernel([0.0] * 4)
    assert tuned(fake, timer=no_timer) == CANDIDATES[1]
    assert fake.launches == [1]


def test_heuristic_kept_unless_beaten_by_the_margin(measurable):
    margin = autotune.HEURISTIC_MARGIN
    fake = FakeKernel([1.0, 1.0 - margin / 2, 1.2, 1.1])  # faster, but within the timing noise the margin allows
    assert tuned(fake) == CANDIDATES[0]
    assert fake.launches == [0, 1, 2, 3, 0]  # the heuristic runs again, last: its outputs are the call's
    autotune.clear_cache(remove_file=True)
    assert tuned(FakeKernel([1.0, 1.0 - 2 * margin, 1.2, 1.1])) == CANDIDATES[1]


def test_candidate_out_of_resources_is_dropped(measurable):
    fake = FakeKernel([3.0, 1.0, 2.0, 1.5], fail={1})
    assert tuned(fake) == CANDIDATES[3]
    assert fake.launches == [0, 2, 3]


def test_heuristic_out_of_resources_is_an_error(measurable):
    with pytest.raises(triton.runtime.errors.OutOfResources):
        tuned(FakeKernel([3.0, 1.0, 2.0, 1.5], fail={0}))


def test_chosen_config_logged_once_per_key(measurable, caplog):
    caplog.set_level(logging.DEBUG, logger=autotune.__name__)
    for _ in range(3):
        tuned(FakeKernel([3.0, 1.0, 2.0, 1.5]))
    records = [r for r in caplog.records if r.name == autotune.__name__ and "->" in r.getMessage()]
    assert len(records) == 1 and "128x256x64" in records[0].getMessage()


# ---------------------------------------------------------------------------------------------------
# when nothing is measured
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("condition", ["env", "interpreter", "tracing", "capturing", "no rows", "cpu"])
def test_disabled_conditions_run_the_heuristic_without_timing(condition, measurable, monkeypatch):
    where = {}
    if condition == "env":
        monkeypatch.setenv(autotune.ENV_SWITCH, "0")
    elif condition == "interpreter":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    elif condition == "tracing":
        where["tracing"] = True
    elif condition == "capturing":
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    elif condition == "no rows":
        where["n_rows"] = 0
    else:
        where["device_type"] = "cpu"
    blocker = autotune.measurement_blocker(where.get("device_type", "cuda"), tracing=where.get("tracing", False),
                                           n_rows=where.get("n_rows", 1000))
    assert blocker is not None
    fake = FakeKernel([3.0, 1.0, 2.0, 1.5])
    assert tuned(fake, timer=no_timer, **where) == CANDIDATES[0]
    assert fake.launches == [0]
    assert autotune.cache_info()["chosen"] == {}  # not remembered: a later eager call tunes


@pytest.mark.parametrize("condition", ["tracing", "capturing", "no rows"])
def test_cached_choice_is_used_where_measuring_is_not_allowed(condition, measurable, monkeypatch):
    tuned(FakeKernel([3.0, 1.0, 2.0, 1.5]))
    where = {"tracing": {"tracing": True}, "no rows": {"n_rows": 0}}.get(condition, {})
    if condition == "capturing":
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    fake = FakeKernel([0.0] * 4)
    assert tuned(fake, timer=no_timer, **where) == CANDIDATES[1]


def test_tuning_off_by_switch_or_interpreter(monkeypatch, measurable):
    assert autotune.enabled()
    monkeypatch.setenv(autotune.ENV_SWITCH, "0")
    assert not autotune.enabled()
    monkeypatch.setenv(autotune.ENV_SWITCH, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not autotune.enabled()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter path")
def test_interpreted_launch_neither_tunes_nor_writes_a_cache(tmp_path):
    """Under TRITON_INTERPRET the kernels run config.INTERPRETER_TILE, as before tuning existed."""
    problem = make_problem(5, 16, 16, 2, mode="paper", dtype=torch.float32, seed=1)
    results = backend_vs_reference("triton", problem, dropout_p=0.1)
    assert all(ok for ok, _ in results), results
    assert autotune.cache_info()["chosen"] == {} and not autotune.cache_path().exists()


# ---------------------------------------------------------------------------------------------------
# the cache file
# ---------------------------------------------------------------------------------------------------


def test_cache_file_round_trip(measurable):
    tuned(FakeKernel([3.0, 1.0, 2.0, 1.5]))
    data = json.loads(autotune.cache_path().read_text())
    assert data["format"] == autotune.FORMAT_VERSION
    assert data["torch"] == torch.__version__ and data["triton"] == triton.__version__
    assert data["entries"] == {autotune.key_string(KEY): CANDIDATES[1].as_dict()}
    autotune.clear_cache()  # a new process: only the file remembers
    fake = FakeKernel([0.0] * 4)
    assert tuned(fake, timer=no_timer) == CANDIDATES[1]
    assert fake.launches == [1]
    assert autotune.cache_info()["chosen"] == {autotune.key_string(KEY): CANDIDATES[1].as_dict()}


def test_cache_file_keeps_other_entries(measurable):
    other_key = KEY[:-1] + (("MODE_PAPER", True),)
    tuned(FakeKernel([3.0, 1.0, 2.0, 1.5]))
    autotune.clear_cache()
    tuned(FakeKernel([1.0, 3.0, 2.0, 1.5]), key=other_key)
    entries = json.loads(autotune.cache_path().read_text())["entries"]
    assert entries == {autotune.key_string(KEY): CANDIDATES[1].as_dict(),
                       autotune.key_string(other_key): CANDIDATES[0].as_dict()}


@pytest.mark.parametrize("stale", ["not a candidate", "other triton", "other format"])
def test_stale_cache_entries_are_ignored(stale, measurable):
    path = autotune.cache_path()
    path.parent.mkdir(parents=True)
    versions = {"format": autotune.FORMAT_VERSION, "torch": torch.__version__, "triton": triton.__version__}
    entry = CANDIDATES[1].as_dict()
    if stale == "not a candidate":
        entry = ForwardConfig(Tile(16, 16, 16, 1, 1)).as_dict()
    elif stale == "other triton":
        versions["triton"] = "0.0.1"
    else:
        versions["format"] = autotune.FORMAT_VERSION + 1
    path.write_text(json.dumps({**versions, "entries": {autotune.key_string(KEY): entry}}))
    fake = FakeKernel([1.0, 3.0, 2.0, 1.5])
    assert tuned(fake) == CANDIDATES[0]
    assert fake.timed == 4


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"entries": 3}'])
def test_corrupt_cache_file_warns_once_and_is_rewritten(content, measurable):
    path = autotune.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.warns(UserWarning, match="corrupt") as record:
        assert tuned(FakeKernel([3.0, 1.0, 2.0, 1.5])) == CANDIDATES[1]
        tuned(FakeKernel([1.0, 3.0, 2.0, 1.5]), key=KEY[:-1] + (("MODE_PAPER", True),))
    assert len([w for w in record if "autotune" in str(w.message)]) == 1
    assert len(json.loads(path.read_text())["entries"]) == 2


def test_unwritable_cache_warns_once_and_tunes_in_memory(measurable, monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(blocker / "cache"))  # a directory under a file: never creatable
    with pytest.warns(UserWarning, match="cannot (read|write)") as record:
        assert tuned(FakeKernel([3.0, 1.0, 2.0, 1.5])) == CANDIDATES[1]
        tuned(FakeKernel([1.0, 3.0, 2.0, 1.5]), key=KEY[:-1] + (("MODE_PAPER", True),))
    assert len([w for w in record if "autotune" in str(w.message)]) == 1
    info = autotune.cache_info()
    assert not info["writable"] and len(info["chosen"]) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuned(FakeKernel([0.0] * 4), timer=no_timer) == CANDIDATES[1]


def test_default_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv(autotune.ENV_CACHE_DIR)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert autotune.cache_path() == tmp_path / ".cache" / "condlora_kernels" / "autotune.json"


def test_clear_cache(measurable):
    tuned(FakeKernel([3.0, 1.0, 2.0, 1.5]))
    assert autotune.cache_info()["chosen"]
    autotune.clear_cache(remove_file=True)
    assert autotune.cache_info()["chosen"] == {} and not autotune.cache_path().exists()


# ---------------------------------------------------------------------------------------------------
# GPU: tuned launches against the reference, and every candidate forced
# ---------------------------------------------------------------------------------------------------

gpu_triton = pytest.mark.skipif(
    not torch.cuda.is_available() or BACKENDS["triton"].unavailable_reason(torch.empty(0, device="cuda")) is not None,
    reason="needs a CUDA device the Triton backend runs on")


def _assert_all_ok(results):
    bad = [msg for ok, msg in results if not ok]
    assert not bad, "\n".join(bad)


class CountingTimer:
    def __init__(self):
        self.calls = 0

    def __call__(self, launch):
        self.calls += 1
        return autotune.cuda_event_timer(launch)


ODD = ("general", 1000, 768, 1000)  # (mode, N, d_in, d_out): nothing a multiple of a tile
PAPER = ("paper", 4096, 1024, 1024)


@requires_cuda
@gpu_triton
@pytest.mark.parametrize("shape,r,dropout_p", [(ODD, 8, 0.0), (PAPER, 16, 0.1)], ids=["odd", "paper-dropout"])
def test_gpu_tuned_against_reference(shape, r, dropout_p, monkeypatch):
    timer = CountingTimer()
    monkeypatch.setattr(autotune, "TIMER", timer)
    mode, n, d_in, d_out = shape
    problem = make_problem(n, d_in, d_out, r, mode=mode, bias=True, dtype=torch.bfloat16, device="cuda", seed=n)
    _assert_all_ok(backend_vs_reference("triton", problem, dropout_p=dropout_p))
    chosen = autotune.cache_info()["chosen"]
    assert sorted(k.split("|")[0] for k in chosen) == ["condlora_bwd", "condlora_fwd"]
    assert timer.calls >= 2 and autotune.cache_path().exists()

    # the call that tuned returned what the cached choice returns, bit for bit (the winner ran last)
    autotune.clear_cache()
    x2d, seed = problem.x, torch.tensor([42], dtype=torch.int64, device="cuda")
    args = (x2d, problem.weight, problem.bias, problem.theta_a, problem.theta_b, 2.0, dropout_p, seed, mode == "paper")
    tuning_call = tk.condlora_forward_launch(*args)
    calls = timer.calls
    cached_call = tk.condlora_forward_launch(*args)
    assert timer.calls == calls  # from the file: no race
    for a, b in zip(tuning_call, cached_call):
        assert torch.equal(a, b)
    dy = torch.randn_like(tuning_call[0])
    bwd_args = (dy, x2d, problem.weight, *tuning_call[2:4], tuning_call[1], 2.0, dropout_p, seed, mode == "paper",
                True, True, True)
    for a, b in zip(tk.condlora_backward_launch(*bwd_args), tk.condlora_backward_launch(*bwd_args)):
        assert torch.equal(a, b)


# Each case shares the tuned test's specializations (shape, dtype, switches), so its configurations
# are compiled once for both tests. CONDLORA_TEST_ALL_CANDIDATES=1 adds the other pools: the TMA main
# loop (its descriptors take the tile's shape), float32, rank 64 and rank 200 (R_PAD 256); about two
# minutes more on an H100, mostly compiling.
FORCED_CASES = [(ODD, torch.bfloat16, 8, 0.0, "pointer"), (PAPER, torch.bfloat16, 16, 0.1, "pointer")]
ALL_CANDIDATES = os.environ.get("CONDLORA_TEST_ALL_CANDIDATES") == "1"
FORCED_CASES += [pytest.param(*case, marks=pytest.mark.skipif(not ALL_CANDIDATES,
                                                              reason="set CONDLORA_TEST_ALL_CANDIDATES=1"))
                 for case in [(ODD, torch.bfloat16, 8, 0.0, "tma"), (ODD, torch.float32, 8, 0.0, "pointer"),
                              (ODD, torch.bfloat16, 64, 0.0, "pointer"), (ODD, torch.bfloat16, 200, 0.1, "pointer")]]


@requires_cuda
@gpu_triton
@pytest.mark.parametrize("shape,dtype,r,dropout_p,main_loop", FORCED_CASES,
                         ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, tuple) else v[0])
def test_gpu_every_candidate_is_correct(shape, dtype, r, dropout_p, main_loop, monkeypatch):
    """Every configuration a race can pick (each pool holds its case's candidates at any shape),
    forced through the launchers' `config`: the forward pool with the backward's heuristic, then every
    backward tile, and the heuristic tile with every helper count, with the forward's heuristic."""
    monkeypatch.setenv(autotune.ENV_SWITCH, "0")  # the direction not forced runs its heuristic
    use_tma = main_loop == "tma"
    mode, n, d_in, d_out = shape
    problem = make_problem(n, d_in, d_out, r, mode=mode, bias=True, dtype=dtype, device="cuda", seed=n)
    r_pad = config.r_pad(r)
    heuristic = config.backward_tile(n, d_in, r_pad, dtype, dropout_p > 0)
    backward = [BackwardConfig(heuristic, helper_scale=s, use_tma=use_tma) for s in (1.0, *config.HELPER_SCALES)]
    backward += [BackwardConfig(t, use_tma=use_tma) for t in config.backward_pool(dtype, r_pad, dropout_p > 0)
                 if t != heuristic]
    forced = [(ForwardConfig(t, use_tma=use_tma), BackwardConfig(use_tma=use_tma))
              for t in config.forward_pool(dtype, r_pad)]
    forced += [(ForwardConfig(use_tma=use_tma), cfg) for cfg in backward]
    for forward_cfg, backward_cfg in forced:
        results = backend_vs_reference(tk.TritonBackend.with_config(forward_cfg, backward_cfg), problem,
                                       dropout_p=dropout_p)
        bad = [msg for ok, msg in results if not ok]
        assert not bad, f"{forward_cfg!r}, {backward_cfg!r}:\n" + "\n".join(bad)


@requires_cuda
@gpu_triton
def test_gpu_torch_compile_takes_the_eager_choice(monkeypatch):
    """Traced by torch.compile the launchers see fake tensors and never race: they take what an eager
    call chose (or the heuristic), and the compiled op matches the eager one. (At the tuned test's
    specializations, whose kernels are compiled already.)"""
    timer = CountingTimer()
    monkeypatch.setattr(autotune, "TIMER", timer)
    mode, n, d_in, d_out = ODD
    problem = make_problem(n, d_in, d_out, 8, mode=mode, bias=True, dtype=torch.bfloat16, device="cuda", seed=n)

    def op(x, weight, bias, theta_a, theta_b):
        return condlora_linear(x, weight, bias, theta_a, theta_b, problem.scaling, mode=mode, backend="triton")

    eager = op(*problem.tensors())
    calls = timer.calls
    assert calls > 0 and len(autotune.cache_info()["chosen"]) == 1
    compiled = torch.compile(op, fullgraph=True)
    torch.testing.assert_close(compiled(*problem.tensors()), eager)
    assert timer.calls == calls
