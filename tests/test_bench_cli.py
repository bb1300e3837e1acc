"""`condlora bench` on CPU: a quick run writes the JSON (rows with device and versions) and the PNG, and
`--markdown` turns the JSON into the README tables and the targets. Timings are not checked, only that they
are there; the targets' logic is checked on a made-up GPU result."""

import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from condlora_kernels.bench import report
from condlora_kernels.bench.cli import (InputError, _levels, _settings, main, parse_args, summary_lines,
                                        target_lines)
from condlora_kernels.bench.first_step import measure_first_steps
from condlora_kernels.bench.providers import PROVIDER_NAMES, flop_count
from condlora_kernels.bench.shapes import MODEL_MODES, MODES, KernelShape, Settings

KERNEL_FIELDS = {"provider", "shape", "mode", "dtype", "median_ms", "ratio_to_frozen", "tflops", "gbps",
                 "peak_mem_bytes", "status", "device", "torch", "triton"}
MODEL_FIELDS = {"provider", "model", "mode", "precision", "median_ms", "examples_per_s", "ratio_to_frozen",
                "ratio_to_peft", "peak_mem_bytes", "step_peak_mem_bytes", "first_step_s", "point_s", "status", "device",
                "torch", "host_mm_us"}
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
H100_RESULT = Path(__file__).parent.parent / "benchmarks" / "results" / "nvidia-h100-80gb-hbm3.json"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main(["--quick", "--device", "cpu", "--output", str(out), "--shapes", "256,64,64,4"])
    return rc, out


def test_quick_cpu_run_writes_json_and_png(quick_run):
    rc, out = quick_run
    assert rc == 0
    results = json.loads((out / "cpu-quick.json").read_text())
    env = results["environment"]
    assert env["device"].startswith("CPU") and env["torch"] and "triton" in env and env["auto_backend"] == "cpu"
    kernel = results["kernel"]
    assert {(r["provider"], r["mode"]) for r in kernel} == {(p, m) for p in PROVIDER_NAMES for m in MODES}
    for row in kernel:
        assert KERNEL_FIELDS <= set(row)
        assert row["shape"] == "256x64x64 r4" and row["dtype"] == "fp32"
        assert row["status"] in ("ok", "skipped", "n/a", "error")
    ok = {r["provider"] for r in kernel if r["status"] == "ok"}
    assert {"frozen", "lora", "paper_code", "condlora[reference]"} <= ok  # the baselines run everywhere
    for row in kernel:
        if row["status"] == "ok":
            assert row["median_ms"] > 0 and row["ratio_to_frozen"] > 0 and row["tflops"] > 0 and row["gbps"] > 0
    frozen = [r for r in kernel if r["provider"] == "frozen"]
    assert all(r["ratio_to_frozen"] == 1.0 for r in frozen)
    host = {r["provider"]: r for r in results["host"]}
    assert set(host) == {"frozen", "condlora"} and host["condlora"]["backend"] == "cpu"
    assert host["frozen"]["ratio_to_frozen"] == 1.0 and host["condlora"]["us_per_call"] > 0
    assert results["first_step"] == []  # off by default on CPU
    if HAS_TRANSFORMERS:
        model = results["model"]
        assert {(r["model"], r["mode"]) for r in model} == {("roberta-tiny", "eager"), ("llama-tiny", "eager")}
        ok_model = [r for r in model if r["status"] == "ok"]
        assert {"frozen", "peft_lora", "paper_code_condlora", "condlora[cpu]", "condlora[reference]"} == \
            {r["provider"] for r in ok_model}
        for row in ok_model:
            assert MODEL_FIELDS <= set(row)
            assert row["examples_per_s"] > 0 and row["first_step_s"] > 0 and row["ratio_to_peft"] > 0
            assert row["host_mm_us"] > 0  # the host's speed where the row was measured
        assert all(r["ratio_to_frozen"] == 1.0 for r in ok_model if r["provider"] == "frozen")
        assert all(r["ratio_to_peft"] == 1.0 for r in ok_model if r["provider"] == "peft_lora")
    if HAS_MATPLOTLIB:
        assert (out / "cpu-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_and_target_lines(quick_run):
    _, out = quick_run
    results = report.read_json(str(out / "cpu-quick.json"))
    if HAS_TRANSFORMERS:
        lines = summary_lines(results)
        assert any(line.startswith("roberta-tiny fp32 eager: fastest CondLoRA condlora[") for line in lines)
    lines = target_lines(results)
    # a CPU run measures one target, the host time on CPU tensors; the GPU models' are not measured
    assert [line.split()[0] for line in lines[1:-1]] in (["met"], ["MISSED"])
    assert "cpu tensors" in lines[1] and "not measured in this run" in lines[-1]


def test_markdown_from_json(quick_run, capsys):
    _, out = quick_run
    capsys.readouterr()
    assert main(["--markdown", str(out / "cpu-quick.json")]) == 0
    text = capsys.readouterr().out
    assert "| N, d_in, d_out, r | frozen (ms) |" in text
    assert "| 256, 64, 64, r=4 |" in text
    assert "| tensors | layer (backend) |" in text and "| CPU | FusedCondLoRALinear (cpu) | 8x64x64 r4 |" in text
    assert "| target (issue #11) | measured | met |" in text
    if HAS_TRANSFORMERS:
        assert "| model | mode | provider | step (ms) | examples/s | × frozen (same mode) | × PEFT LoRA (same mode) " \
               "| peak memory (GiB) | steady peak (GiB) | first step (s) | host mm (µs) |" in text
        assert "| roberta-tiny 2×64 fp32 | eager | peft_lora |" in text and "lower is better" in text


def test_top_level_cli_routes_to_bench(quick_run, capsys):
    """`python -m condlora_kernels bench -- ARGS` reaches condlora_kernels.bench.cli.main."""
    from condlora_kernels.__main__ import main as top_main

    _, out = quick_run
    capsys.readouterr()
    assert top_main(["bench", "--", "--markdown", str(out / "cpu-quick.json")]) == 0
    assert "frozen (ms)" in capsys.readouterr().out


def test_merge_replaces_only_what_was_measured_again(quick_run, tmp_path):
    """A run in parts: `--only host --merge` keeps the kernel and model rows and replaces the host rows."""
    _, out = quick_run
    shutil.copy(out / "cpu-quick.json", tmp_path / "cpu-quick.json")
    before = report.read_json(str(tmp_path / "cpu-quick.json"))
    assert main(["--quick", "--device", "cpu", "--only", "host", "--merge", "--no-plot", "--output",
                 str(tmp_path)]) == 0
    after = report.read_json(str(tmp_path / "cpu-quick.json"))
    assert after["kernel"] == before["kernel"] and after["model"] == before["model"]
    assert len(after["host"]) == 2 and after["host"] != before["host"]
    assert [run["created"] for run in after["runs"]] == [before["created"], after["created"]]
    other = dict(after, environment=dict(after["environment"], device="NVIDIA H200"))
    with pytest.raises(ValueError, match="from 'CPU.*NVIDIA H200"):
        report.merge_results(after, other)


def test_a_stopped_run_keeps_what_it_measured(quick_run, tmp_path, monkeypatch):
    """The JSON is rewritten after every point, whole (a temporary file renamed): a run stopped at its second model
    point (a time limit on the device) leaves the first point's row, merged with the earlier result, and no
    temporary file."""
    _, out = quick_run
    shutil.copy(out / "cpu-quick.json", tmp_path / "cpu-quick.json")
    before = report.read_json(str(tmp_path / "cpu-quick.json"))
    from condlora_kernels.bench import cli
    from condlora_kernels.bench.kernels import Point

    def measure_then_stop(self, case, precision, mode, provider):
        if self.rows:
            raise KeyboardInterrupt  # what `timeout` does to the run, as far as the suite is concerned
        row = {"provider": provider, "model": case.name, "mode": mode, "precision": precision, "dropout": 0.0,
               "status": "ok", "median_ms": 1.0, "point_s": 0.0, "ratio_to_frozen": None, "ratio_to_peft": None}
        self.rows.append(row)
        return Point([row])

    monkeypatch.setattr(cli.ModelSuite, "measure", measure_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main(["--quick", "--device", "cpu", "--only", "model", "--providers", "frozen", "condlora[reference]",
              "--merge", "--no-plot", "--output", str(tmp_path)])
    after = report.read_json(str(tmp_path / "cpu-quick.json"))
    assert after["kernel"] == before["kernel"] and after["host"] == before["host"]
    stopped = [row for row in after["model"] if row["median_ms"] == 1.0]
    assert len(stopped) == 1 and stopped[0]["provider"] == "frozen"
    assert len(after["model"]) == len(before["model"])  # the first point replaced its earlier row, nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu-quick.json"]


def test_settings_and_levels_from_options():
    cpu = torch.device("cpu")
    args = parse_args(["--model-modes", "reduce-overhead", "eager", "--providers", "frozen", "condlora[reference]"])
    settings = _settings(args, cpu)
    assert settings.model_modes == ("eager", "reduce-overhead")  # in the canonical order
    assert settings.eager_only_providers == ()  # named: runs in every mode
    assert _levels(args, settings) == {"kernel", "model", "host"}  # no first step by default on CPU
    assert _levels(parse_args(["--only", "model", "--first-step"]), Settings(first_step=True)) == \
        {"model", "first-step"}
    assert _levels(parse_args(["--only", "host"]), Settings(first_step=True)) == {"host"}
    assert _levels(parse_args(["--only", "host", "first-step"]), Settings()) == {"host", "first-step"}
    assert Settings.for_device("cuda").model_modes == MODEL_MODES and Settings.for_device("cuda").first_step
    assert Settings.for_device("cuda", quick=True).model_modes == ("eager", "reduce-overhead")
    assert Settings.for_device("cpu").model_modes == ("eager",)


def test_models_option_keeps_the_named_cases():
    cuda_settings = _settings(parse_args(["--models", "llama-4096-2L"]), torch.device("cuda"))
    assert [case.name for case, _ in cuda_settings.model_cases] == ["llama-4096-2L"]
    with pytest.raises(InputError, match="matches none of .*roberta-tiny"):
        _settings(parse_args(["--models", "roberta-base"]), torch.device("cpu"))  # CPU runs the tiny cases


def test_rounds_option():
    assert _settings(parse_args([]), torch.device("cpu")).model_rounds == 1
    assert _settings(parse_args(["--rounds", "3"]), torch.device("cuda")).model_rounds == 3
    with pytest.raises(InputError, match="--rounds must be >= 1, got 0"):
        _settings(parse_args(["--rounds", "0"]), torch.device("cpu"))


def test_prime_compile_option():
    """Compiled points are primed on GPU runs (where peaks are measured), not on CPU; the option overrides both."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _settings(parse_args([]), cuda).prime_compile and _settings(parse_args(["--quick"]), cuda).prime_compile
    assert not _settings(parse_args([]), cpu).prime_compile
    assert not _settings(parse_args(["--no-prime-compile"]), cuda).prime_compile
    assert _settings(parse_args(["--prime-compile"]), cpu).prime_compile


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_first_step_in_fresh_processes():
    """Cold then warm process per provider with the cache directories set; unavailable providers start none."""
    settings = Settings.for_device("cpu")
    rows = {r["provider"]: r for r in measure_first_steps(torch.device("cpu"), settings,
                                                           ["condlora[cpu]", "condlora[triton]"])}
    ours = rows["condlora[cpu]"]
    assert ours["status"] == "ok", ours["reason"]
    assert ours["model"] == "roberta-tiny" and ours["mode"] == "eager"
    for cache in ("cold", "warm"):
        assert 0 < ours[f"{cache}_s"] < ours[f"{cache}_process_s"]
    assert rows["condlora[triton]"]["status"] == "skipped" and rows["condlora[triton]"]["cold_process_s"] is None


# --------------------------------------------------------------------------------------------------
# Reports from made-up results
# --------------------------------------------------------------------------------------------------


def _row(provider, mode, status="ok", ratio=1.0, timer="cpu", repeat=0, shape="8x4x6 r2 general"):
    ok = status == "ok"
    return {"provider": provider, "shape": shape, "mode": mode, "dtype": "fp32", "timer": timer, "repeat": repeat,
            "median_ms": 1.0 if ok else None, "ratio_to_frozen": ratio if ok else None, "status": status,
            "reason": {"error": "boom", "n/a": "square only"}.get(status, "")}


def _results(**levels):
    return {"schema": report.SCHEMA, "created": "2026-01-01T00:00:00", "settings": {"quick": True},
            "environment": {"device": "NVIDIA H200", "device_type": "cuda", "torch": "x", "triton": "y",
                            "auto_backend": "cuda"},
            **{level: levels.get(level, []) for level in ("kernel", "model", "host", "first_step")}, "notes": []}


def _model_row(model, mode, provider, ms, peak_gib=1.0, status="ok"):
    return {"model": model, "mode": mode, "provider": provider, "precision": "bf16", "batch": 16, "seq": 512,
            "median_ms": ms if status == "ok" else None, "examples_per_s": 16 / ms * 1e3,
            "peak_mem_bytes": int(peak_gib * report.GiB), "first_step_s": 2.0, "status": status,
            "reason": "boom" if status == "error" else ""}


def _gpu_model_rows():
    """Frozen 10 ms, PEFT 12 ms, condlora[triton] 10.4 ms and condlora[cuda] 11 ms everywhere, except that on
    the Llama stack under compile both CondLoRA backends take 13 ms, and condlora[cuda] errs under
    reduce-overhead on RoBERTa; CondLoRA's peak memory is 0.9 GiB against PEFT's 1.0 GiB."""
    rows = []
    for model in ("roberta-base", "llama-4096-2L"):
        for mode in MODEL_MODES:
            slow = model == "llama-4096-2L" and mode == "compile"
            rows += [_model_row(model, mode, "frozen", 10.0), _model_row(model, mode, "peft_lora", 12.0),
                     _model_row(model, mode, "condlora[triton]", 13.0 if slow else 10.4, 0.9),
                     _model_row(model, mode, "condlora[cuda]", 13.0 if slow else 11.0, 0.9,
                                status="error" if (model, mode) == ("roberta-base", "reduce-overhead") else "ok")]
    report.fill_model_ratios(rows)
    return rows


def test_targets_of_a_gpu_result():
    host = [{"provider": p, "layer": layer, "backend": backend, "device_type": "cpu", "shape": "8x64x64 r4",
             "us_per_call": us, "ratio_to_frozen": us / 20.0, "status": "ok", "reason": ""}
            for p, layer, backend, us in (("frozen", "nn.Linear", None, 20.0),
                                          ("condlora", "FusedCondLoRALinear", "cpu", 30.0))]
    first = [{"provider": p, "model": "roberta-base", "precision": "bf16", "cold_s": cold, "warm_s": warm,
              "cold_process_s": cold + 9, "warm_process_s": warm + 8, "status": "ok", "reason": ""}
             for p, cold, warm in (("peft_lora", 1.0, 0.5), ("condlora[triton]", 30.0, 1.0),
                                   ("condlora[cuda]", 5.0, 2.0))]
    results = _results(model=_gpu_model_rows(), host=host, first_step=first)
    met = {target: m for target, _, m in report.targets(results)}
    required = "faster than PEFT LoRA in every mode on both models, peak memory not higher (required)"
    assert met[f"best CondLoRA {required}"] is False  # the Llama stack under compile
    assert met["roberta-base eager: best CondLoRA faster than PEFT LoRA, peak memory not higher"] is True
    assert met["llama-4096-2L compile: best CondLoRA faster than PEFT LoRA, peak memory not higher"] is False
    assert met["roberta-base eager: best CondLoRA step ≤ 1.15× frozen"] is True  # 1.04×
    assert met["roberta-base eager: condlora[cuda] (auto) step ≤ 1.15× frozen"] is True  # 1.10×
    assert met["roberta-base compile: condlora[cuda] (auto) step ≤ 1.05× frozen"] is False  # 1.10×
    assert met["roberta-base reduce-overhead: condlora[cuda] (auto) step ≤ 1.05× frozen"] is None  # it erred
    assert met[f"condlora[cuda] (auto) {required}"] is False
    assert met["host time of FusedCondLoRALinear fwd+bwd, cpu tensors: ≤ 2× frozen nn.Linear's"] is True
    assert met["host time of FusedCondLoRALinear fwd+bwd, cuda tensors: ≤ 3× frozen nn.Linear's"] is None
    # best first step: condlora[cuda] cold (5 s ≤ 1 + 10), condlora[triton] warm (1 s ≤ 0.5 + 1)
    assert met["roberta-base first step, cold caches: best CondLoRA ≤ PEFT LoRA's + 10 s"] is True
    assert met["roberta-base first step, warm caches: best CondLoRA ≤ PEFT LoRA's + 1 s"] is True
    assert met["roberta-base first step, warm caches: condlora[cuda] (auto) ≤ PEFT LoRA's + 1 s"] is False
    text = report.markdown(results)
    assert "| roberta-base 16×512 bf16 | compile | condlora[triton] | 10.4 | 1538.5 | 1.04× | 0.87× | 0.90 | – | " \
           "2.00 |" in text
    assert "| roberta-base bf16 | condlora[triton] | 30.0 | 1.00 | 39.0 | 9.00 |" in text  # the first-step table
    assert "| roberta-base first step, cold caches: best CondLoRA ≤ PEFT LoRA's + 10 s | condlora[cuda]: 5.0 s vs " \
           "PEFT 1.0 s | yes |" in text
    assert "`condlora[cuda]` (roberta-base bf16 reduce-overhead): error: boom" in text


def test_targets_of_the_recompute_rows():
    """condlora[<auto>]+recompute gets its own scope for the model targets, and "best CondLoRA" (the backends
    with their default settings) does not take it even where it is fastest."""
    rows = _gpu_model_rows()
    rows += [_model_row(model, mode, "condlora[cuda]+recompute", 9.0, 0.8)
             for model in ("roberta-base", "llama-4096-2L") for mode in MODEL_MODES]
    report.fill_model_ratios(rows)
    results = _results(model=rows)
    met = {target: (measured, m) for target, measured, m in report.targets(results)}
    required = "faster than PEFT LoRA in every mode on both models, peak memory not higher (required)"
    assert met[f"condlora[cuda]+recompute {required}"] == ("6 of 6 points met, 0 not measured", True)
    measured, ok = met["llama-4096-2L compile: best CondLoRA faster than PEFT LoRA, peak memory not higher"]
    assert measured.startswith("condlora[triton]:") and ok is False  # 13 ms: not the +recompute row's 9 ms
    assert "roberta-base first step, cold caches: condlora[cuda]+recompute ≤ PEFT LoRA's + 10 s" not in met
    assert "*+recompute*" in report.targets_markdown(results)
    without = {target for target, _, _ in report.targets(_results(model=_gpu_model_rows()))}
    assert f"condlora[cuda]+recompute {required}" not in without


def test_kernel_targets():
    """The small layer's target reads its CUDA-graph repeats (median of their ratios), the large shape's the main
    timer; bf16 rows only; a shape the result lacks is not measured, and a fast fp32 row does not count."""
    small, large = "8192x768x768 r8", "16384x4096x4096 r16"
    rows = []
    for repeat, (cuda, triton) in enumerate(((1.5, 2.0), (1.7, 2.1), (1.55, 1.9))):
        rows += [_row("condlora[cuda]", "forward+backward", ratio=cuda, timer="cudagraph", repeat=repeat, shape=small),
                 _row("condlora[triton]", "forward+backward", ratio=triton, timer="cudagraph", repeat=repeat,
                      shape=small)]
    rows += [_row("condlora[cuda]", "forward+backward", ratio=3.0, timer="do_bench", shape=small),  # not the timer
             _row("condlora[cuda]", "forward", ratio=1.12, timer="do_bench", shape=large),
             _row("condlora[triton]", "forward", ratio=1.08, timer="do_bench", shape=large)]
    for row in rows:
        row["dtype"] = "bf16"
    rows.append(_row("condlora[cuda]", "forward+backward", ratio=1.0, timer="do_bench", shape=large))  # fp32
    met = {target: (measured, m) for target, measured, m in report.targets(_results(kernel=rows))}
    graphs = "kernel level, 8192x768x768 r8, forward+backward under CUDA graphs"
    assert met[f"{graphs}: condlora[cuda] (auto) ≤ 1.6× frozen"] == ("condlora[cuda]: 1.55× (median of 3 repeats)",
                                                                     True)
    assert met[f"{graphs}: best CondLoRA ≤ 1.6× frozen"][0].startswith("condlora[cuda]: 1.55×")
    assert met["kernel level, 16384x4096x4096 r16, forward: condlora[cuda] (auto) ≤ 1.1× frozen"] == \
        ("condlora[cuda]: 1.12×", False)
    assert met["kernel level, 16384x4096x4096 r16, forward: best CondLoRA ≤ 1.1× frozen"] == \
        ("condlora[triton]: 1.08×", True)
    assert met["kernel level, 16384x4096x4096 r16, forward+backward: best CondLoRA ≤ 1.15× frozen"] == \
        ("not measured", None)
    assert "| kernel level, 8192x768x768 r8, forward+backward under CUDA graphs: best CondLoRA ≤ 1.6× frozen | " \
           "condlora[cuda]: 1.55× (median of 3 repeats) | yes |" in report.targets_markdown(_results(kernel=rows))


def test_a_higher_peak_names_the_requested_and_reserved_bytes():
    """Where CondLoRA's peak is above PEFT's, the target's figure says how much of it the tensors asked for (the
    rest is the allocator's block rounding) and how the reserved memory compares; the verdict stays on the peak."""
    rows = _gpu_model_rows()
    for row in rows:
        row.update(peak_requested_bytes=row["peak_mem_bytes"] - 1000, peak_reserved_bytes=row["peak_mem_bytes"])
        if row["provider"] == "condlora[cuda]" and (row["model"], row["mode"]) == ("roberta-base", "compile"):
            row.update(peak_mem_bytes=1024 ** 3 + 4096, peak_requested_bytes=1024 ** 3 - 5000,
                       peak_reserved_bytes=1024 ** 3 - 2 * 1024 ** 2)
    results = _results(model=rows)
    met = {target: (measured, m) for target, measured, m in report.targets(results)}
    measured, ok = met["roberta-base compile: condlora[cuda] (auto) faster than PEFT LoRA, peak memory not higher"]
    assert ok is False
    assert "(+4,096 bytes; requested by the tensors: -4,000 bytes; reserved: -2,097,152 bytes)" in measured
    measured, ok = met["roberta-base eager: condlora[cuda] (auto) faster than PEFT LoRA, peak memory not higher"]
    assert ok is True and "requested" not in measured


def test_old_results_still_read():
    """Schema 1 (eager model rows with examples/s over PEFT's) reads as eager rows with time ratios."""
    results = report.read_json(str(H100_RESULT))
    rows = {(r["model"], r["precision"], r["provider"]): r for r in results["model"]}
    assert {r["mode"] for r in results["model"]} == {"eager"}
    peft, ours = rows[("roberta-base", "bf16", "peft_lora")], rows[("roberta-base", "bf16", "condlora[cuda]")]
    assert ours["ratio_to_peft"] == pytest.approx(ours["median_ms"] / peft["median_ms"], rel=1e-6)
    assert "| roberta-base 16×512 bf16 | eager | condlora[cuda] |" in report.markdown(results)


def test_markdown_and_plot_of_error_and_na_rows(tmp_path):
    rows = [_row("frozen", m) for m in MODES] + [_row("lora", m, ratio=2.0) for m in MODES]
    rows += [_row("paper_code", m, status="n/a") for m in MODES] + [_row("condlora[triton]", m, status="error")
                                                                     for m in MODES]
    rows += [_row(p, m, shape="8x4x4 r2") for p in ("frozen", "paper_code") for m in MODES]
    rows += [_row("frozen", "forward", timer="cudagraph", repeat=1)]
    results = _results(kernel=rows, model=_gpu_model_rows())
    text = report.markdown(results)
    assert "2.00× / 2.00× / 2.00×" in text and "| n/a |" in text and "| err |" in text
    assert "`condlora[triton]`: error: boom" in text
    assert "(run 2)" in text
    if HAS_MATPLOTLIB:
        assert report.plot(results, str(tmp_path / "p.png")) is None
        assert (tmp_path / "p.png").exists()


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib")
def test_bars_carry_their_values_and_the_legend_covers_none():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"g": g, "s": s, "v": v} for g, s, v in (("a", "x", 1.5), ("a", "y", 2.25), ("b", "x", 0.75))]
    fig, ax = plt.subplots()
    report._bars(ax, rows, lambda r: r["g"], lambda r: r["s"], lambda r: r["v"], {"x": "red", "y": "blue"})
    fig.canvas.draw()
    labels = sorted(t.get_text() for t in ax.texts if t.get_text())
    assert labels == ["0.75", "1.50", "2.25"]  # one per bar that exists; the missing (b, y) bar has none
    assert math.isnan(ax.containers[1].datavalues[1])
    legend, axes_box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.y1 < axes_box.y0  # below the axes: over no bar
    plt.close(fig)


def test_flop_count_matches_design_cost_model():
    shape = KernelShape(16384, 4096, 4096, 16)
    n, d, r = 16384, 4096, 16
    assert flop_count("frozen", shape, "forward") == 2 * n * d * d
    assert flop_count("condlora", shape, "forward") == 2 * n * d * d + 4 * r * d * d + 2 * n * r * 2 * d
    assert flop_count("lora", shape, "forward+backward") == 4 * n * d * d + 3 * 2 * n * r * 2 * d


@pytest.mark.parametrize("options, message", [
    (["--only", "host", "--shapes", "8.5,16,16,2"], "--shapes: '8.5,16,16,2' is not four integers >= 1"),
    (["--only", "host", "--shapes", "8,16,16"], "--shapes: '8,16,16' is not four integers >= 1"),
    (["--only", "kernel", "--shapes", "8,16,16,2"], "--shapes 8,16,16,2 matches none of this run's shapes: 256,64"),
    (["--only", "host", "--threads", "0"], "--threads must be >= 1, got 0"),
    (["--only", "model", "--dropout", "1.5"], r"--dropout must be in \[0, 1\), got 1.5"),
    (["--only", "model", "--dropout=-0.5"], r"--dropout must be in \[0, 1\), got -0.5"),
    (["--only", "host", "--rounds", "0"], "--rounds must be >= 1, got 0"),
])
def test_bad_options_are_one_line_and_exit_2(tmp_path, capsys, options, message):
    out = tmp_path / "out"
    assert main(["--quick", "--device", "cpu", "--no-plot", "--output", str(out), *options]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("condlora bench: ") and re.search(message, err[0]), err
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("content, message", [
    (None, "cannot be read as a condlora bench result"),
    ("", "cannot be read as a condlora bench result"),
    ("[1, 2, 3]", "a JSON list, not an object"),
    ('{"schema": 2}', "lacks"),
    ('{"foo": 1}', "not a condlora bench result of schema 2"),
])
def test_markdown_and_merge_of_a_bad_file_are_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "cpu-quick.json"
    if content is not None:
        path.write_text(content)
    assert main(["--markdown", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("condlora bench: --markdown ") and message in err[0], err
    if content is not None:
        before = path.read_bytes()
        assert main(["--quick", "--device", "cpu", "--only", "host", "--merge", "--no-plot", "--output",
                     str(tmp_path)]) == 2
        assert message in capsys.readouterr().err and path.read_bytes() == before  # refused before any point


def test_merge_into_another_devices_result_is_refused_before_any_point(quick_run, tmp_path, capsys):
    _, out = quick_run
    results = json.loads((out / "cpu-quick.json").read_text())
    results["environment"]["device"] = "NVIDIA H200"
    (tmp_path / "cpu-quick.json").write_text(json.dumps(results))
    assert main(["--quick", "--device", "cpu", "--only", "host", "--merge", "--no-plot", "--output",
                 str(tmp_path)]) == 2
    assert "is from 'NVIDIA H200', this run from 'CPU'" in capsys.readouterr().err


def test_output_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["--quick", "--device", "cpu", "--only", "host", "--no-plot", "--output", str(tmp_path / "file")]) == 2
    assert "--output" in capsys.readouterr().err and (tmp_path / "file").read_text() == "x"


def test_a_run_whose_points_raised_exits_1(tmp_path, monkeypatch, capsys):
    """The rows are written (status 'error', the message in the JSON), and the exit code tells a script."""
    from condlora_kernels.bench import host

    monkeypatch.setattr(host, "host_steps", lambda device: (_ for _ in ()).throw(RuntimeError("boom")))
    assert main(["--quick", "--device", "cpu", "--only", "host", "--no-plot", "--output", str(tmp_path)]) == 1
    rows = json.loads((tmp_path / "cpu-quick.json").read_text())["host"]
    assert {r["status"] for r in rows} == {"error"} and "boom" in rows[0]["reason"]


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--only", "everything"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("condlora bench: error: argument --only"), err


WARMUP_PROBE = """
import sys, torch, torch.nn.functional as F
from condlora_kernels.bench.model import ModelSuite
from condlora_kernels.bench.shapes import Settings
if sys.argv[1] == "warm":
    ModelSuite(torch.device("cuda"), Settings())._warm_libraries()
x = torch.randn(256, 768, device="cuda", requires_grad=True)
w, b = torch.randn(768, 768, device="cuda"), torch.randn(768, device="cuda")
torch.cuda.synchronize()
before = torch.cuda.memory_allocated()
with torch.autocast("cuda", dtype=torch.bfloat16):
    y = F.linear(x, w, b)
y.sum().backward()
del y
x.grad = None
torch.cuda.synchronize()
print(torch.cuda.memory_allocated() - before)
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_suite_makes_the_libraries_one_time_allocations_before_its_first_point():
    """A model point's peak counts what the point allocates; cuBLAS's workspaces, which a process allocates on its
    first GEMMs and keeps, are made by the suite before its first point. In a fresh process: without the warm-up
    a layer's first training step leaves them allocated (so the check below can fail), after it nothing."""
    import subprocess
    import sys

    kept = {how: int(subprocess.run([sys.executable, "-c", WARMUP_PROBE, how], capture_output=True, text=True,
                                    check=True).stdout.split()[-1]) for how in ("cold", "warm")}
    assert kept["cold"] > 0, kept
    assert kept["warm"] == 0, kept
