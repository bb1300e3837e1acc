"""`condlora bench` on CPU: a quick run writes the JSON (rows with device and versions) and the PNG, and
`--markdown` turns the JSON into the README tables. Timings are not checked, only that they are there."""

import importlib.util
import json

import pytest

from condlora_kernels.bench import report
from condlora_kernels.bench.cli import main
from condlora_kernels.bench.providers import PROVIDER_NAMES, flop_count
from condlora_kernels.bench.shapes import MODES, KernelShape

KERNEL_FIELDS = {"provider", "shape", "mode", "dtype", "median_ms", "ratio_to_frozen", "tflops", "gbps",
                 "peak_mem_bytes", "status", "device", "torch", "triton"}
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


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
    assert env["device"].startswith("CPU") and env["torch"] and "triton" in env
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
    if importlib.util.find_spec("transformers") is not None:
        model = results["model"]
        assert {r["model"] for r in model} == {"roberta-tiny", "llama-tiny"}
        assert all(r["examples_per_s"] > 0 for r in model if r["status"] == "ok")
        assert {"frozen", "paper_code_condlora", "condlora[reference]"} <= {r["provider"] for r in model
                                                                            if r["status"] == "ok"}
    if HAS_MATPLOTLIB:
        assert (out / "cpu-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_from_json(quick_run, capsys):
    _, out = quick_run
    capsys.readouterr()
    assert main(["--markdown", str(out / "cpu-quick.json")]) == 0
    text = capsys.readouterr().out
    assert "| N, d_in, d_out, r | frozen (ms) |" in text
    assert "| 256, 64, 64, r=4 |" in text


def test_top_level_cli_routes_to_bench(quick_run, capsys):
    """`python -m condlora_kernels bench -- ARGS` reaches condlora_kernels.bench.cli.main."""
    from condlora_kernels.__main__ import main as top_main

    _, out = quick_run
    capsys.readouterr()
    assert top_main(["bench", "--", "--markdown", str(out / "cpu-quick.json")]) == 0
    assert "frozen (ms)" in capsys.readouterr().out


def _row(provider, mode, status="ok", ratio=1.0, timer="cpu", repeat=0, shape="8x4x6 r2 general"):
    ok = status == "ok"
    return {"provider": provider, "shape": shape, "mode": mode, "dtype": "fp32", "timer": timer, "repeat": repeat,
            "median_ms": 1.0 if ok else None, "ratio_to_frozen": ratio if ok else None, "status": status,
            "reason": {"error": "boom", "n/a": "square only"}.get(status, "")}


def test_markdown_and_plot_of_error_and_na_rows(tmp_path):
    rows = [_row("frozen", m) for m in MODES] + [_row("lora", m, ratio=2.0) for m in MODES]
    rows += [_row("paper_code", m, status="n/a") for m in MODES] + [_row("condlora[triton]", m, status="error")
                                                                     for m in MODES]
    rows += [_row(p, m, shape="8x4x4 r2") for p in ("frozen", "paper_code") for m in MODES]
    rows += [_row("frozen", "forward", timer="cudagraph", repeat=1)]
    results = {"schema": report.SCHEMA, "created": "2026-01-01T00:00:00", "settings": {"quick": True},
               "environment": {"device": "CPU", "device_type": "cpu", "torch": "x", "triton": "y"},
               "kernel": rows, "model": [], "notes": []}
    text = report.markdown(results)
    assert "2.00× / 2.00× / 2.00×" in text and "| n/a |" in text and "| err |" in text
    assert "`condlora[triton]`: error: boom" in text
    assert "(run 2)" in text
    if HAS_MATPLOTLIB:
        assert report.plot(results, str(tmp_path / "p.png")) is None
        assert (tmp_path / "p.png").exists()


def test_flop_count_matches_design_cost_model():
    shape = KernelShape(16384, 4096, 4096, 16)
    n, d, r = 16384, 4096, 16
    assert flop_count("frozen", shape, "forward") == 2 * n * d * d
    assert flop_count("condlora", shape, "forward") == 2 * n * d * d + 4 * r * d * d + 2 * n * r * 2 * d
    assert flop_count("lora", shape, "forward+backward") == 4 * n * d * d + 3 * 2 * n * r * 2 * d
