"""`condlora check` (also `python -m condlora_kernels`): every backend the machine runs against the reference."""

import pytest
import torch

import condlora_kernels.testing
from condlora_kernels.__main__ import main


def test_check_passes_and_lists_every_backend(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "0 failing case(s)" in out
    rows = [line.split() for line in out.splitlines()[2:-1]]
    assert {row[0] for row in rows} == {"triton", "cuda", "cpu"}  # the reference is the yardstick, not a row
    cpu_rows = [row for row in rows if row[:2] == ["cpu", "cpu"]]
    assert len(cpu_rows) == 8 and all("ok" in row for row in cpu_rows)  # 2 dtypes x 2 modes x dropout on/off
    assert all("rel." in " ".join(row) for row in cpu_rows)  # each row reports its worst error


@pytest.mark.parametrize("broken", ["wrong", "crash"])
def test_check_fails_when_a_backend_is_off(monkeypatch, capsys, broken):
    """A backend whose outputs miss the bound, or that raises, makes the check fail (exit code 1) and names it."""
    real = condlora_kernels.testing.backend_vs_reference

    def off(name, problem, **kwargs):
        if name != "cpu":
            return real(name, problem, **kwargs)
        if broken == "crash":
            raise RuntimeError("simulated kernel failure")
        results = real(name, problem, **kwargs)
        return [(False, "y: rel. error 1.00e+00 vs bound 1.00e-06 (simulated)")] + results[1:]

    monkeypatch.setattr(condlora_kernels.testing, "backend_vs_reference", off)
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert "8 failing case(s)" in out
    detail = "RuntimeError: simulated kernel failure" if broken == "crash" else "(simulated)"
    assert sum(line.startswith("cpu") and "FAIL" in line and detail in line for line in out.splitlines()) == 8


def test_check_runs_as_the_package_entry_point():
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    if torch.cuda.is_available():  # the Triton kernels on the GPU, not under the interpreter conftest.py sets
        env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-m", "condlora_kernels"], capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "0 failing case(s)" in done.stdout and torch.__version__ in done.stdout
