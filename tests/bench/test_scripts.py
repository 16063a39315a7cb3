"""The GPU benchmark scripts in benchmarks/ run end to end on CPU (tiny shapes, timings meaningless).

A device lease is short: a script that dies on an argument or a renamed API there costs the
whole run. These smoke runs are what CI can check of them; benchmarks/gpu_session.sh runs them
for real on a GPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from pidrt.engines.fast_torch import FastTorchConfig

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _bench(name):
    spec = importlib.util.spec_from_file_location(f"_pidrt_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["bench_unet_step", "bench_generation"])
def test_help_and_clear_refusals(name, tmp_path, capsys):
    bench = _bench(name)
    with pytest.raises(SystemExit) as done:
        bench.main(["--help"])
    assert done.value.code == 0 and "--preset" in capsys.readouterr().out
    assert bench.main(["--out", str(tmp_path / "x"), "--device", "cpu"]) == 2  # sd15 on CPU
    assert "--preset tiny --device cpu" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench.main(["--out", str(tmp_path / "x")]) == 2
        assert "torch sees none" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _outputs(stem: Path) -> dict:
    assert stem.with_suffix(".md").read_text().startswith("# ")
    return json.loads(stem.with_suffix(".json").read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke form")
def test_bench_kernels_smoke(tmp_path, capsys):
    bench = _bench("bench_kernels")
    assert bench.main(["--out", str(tmp_path / "k")]) == 2 and "--smoke" in capsys.readouterr().err
    assert os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py
    assert bench.main(["--out", str(tmp_path / "k"), "--smoke", "--warmup", "1", "--rep", "5", "--sweep"]) == 0
    result = _outputs(tmp_path / "k")
    assert [r["kernel"] for r in result["rows"]] == ["few_token", "dual_kv_self", "dual_kv_cross", "group_norm_silu"]
    assert [bool(r["sweep"]) for r in result["rows"]] == [True, True, False, True]  # dual-KV: self-attention only
    assert set(result["rows"][3]["ms"]) == {"triton_fused", "triton_nchw", "torch_nhwc", "torch_nchw"}
    assert "Tile sweep" in (tmp_path / "k.md").read_text()
    assert all(r["max_abs_err"] < 2e-2 and r["ms"]["triton_fused"] > 0 for r in result["rows"])
    assert result["meta"]["peaks_are_nominal"] and result["meta"]["peak_bw"] == 3.35e12  # not an H200
    assert result["meta"]["complete"] and "INCOMPLETE" not in (tmp_path / "k.md").read_text()
    assert result["meta"]["failed"] == {}


def test_bench_unet_step_smoke(tmp_path, capsys):
    bench, out = _bench("bench_unet_step"), tmp_path / "step"
    assert bench.main(["--out", str(out), "--preset", "tiny", "--device", "cpu", "--variants", "fast,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert bench.main(["--out", str(out), "--preset", "tiny", "--device", "cpu", "--no-kernels",
                       "--cases", "base,sca,eaa", "--variants", "fast,nchw", "--warmup", "1", "--rep", "5",
                       "--profile"]) == 0
    result = _outputs(out)
    rows = {r["case"]: r for r in result["rows"]}
    assert set(rows) == {"base", "sca", "eaa"} and result["meta"]["complete"]  # rewritten per case; last is whole
    for r in rows.values():  # fp32 on CPU: every variant computes what the reference does
        assert set(r["ms"]) == {"reference", "fast", "nchw"}
        assert all(e["finite"] and e["rel_l2"] < 1e-4 for e in r["vs_reference"].values())
    assert rows["sca"]["target_ratio"] == 1.03 and rows["eaa"]["target_ratio"] == 1.30
    assert result["fast_backend"]["nchw"]["config"]["channels_last"] is False
    assert set(result["profiles"]) == set(rows) and all(result["profiles"][c] for c in rows)
    assert "Profile, fast, eaa" in out.with_suffix(".md").read_text()
    # Every variant is a valid config (fused-norms is too slow in the interpreter to time here;
    # tests/kernels/test_fast_torch_cpu.py checks that UNet against the reference).
    for changes in bench.VARIANTS.values():
        dataclasses.replace(FastTorchConfig(), **changes)


def test_bench_unet_step_reports_a_failing_variant_and_goes_on(tmp_path, monkeypatch):
    import pidrt.engines.fast_torch as fast_torch

    bench, out = _bench("bench_unet_step"), tmp_path / "step"
    make_fast = fast_torch.make_fast

    def flaky(pipe, config, **kw):  # the variant marked max_buckets=7 fails on its first step
        made = make_fast(pipe, config, **kw)
        if config.max_buckets == 7:
            made.unet = lambda *a: (_ for _ in ()).throw(RuntimeError("kernel does not compile\ndetails"))
        return made

    monkeypatch.setattr(fast_torch, "make_fast", flaky)
    monkeypatch.setitem(bench.VARIANTS, "cudnn-on-cpu", {"sdpa_backend": "cudnn"})  # refused when built
    monkeypatch.setitem(bench.VARIANTS, "late", {"max_buckets": 7})
    assert bench.main(["--out", str(out), "--preset", "tiny", "--device", "cpu", "--no-kernels", "--cases",
                       "base,sca", "--variants", "fast,cudnn-on-cpu,late", "--warmup", "1", "--rep", "3"]) == 0
    result = _outputs(out)
    failed = result["meta"]["failed"]
    assert failed["cudnn-on-cpu"].startswith("PidrtError: sdpa_backend 'cudnn' needs a CUDA device")
    assert failed["late"] == "base: RuntimeError: kernel does not compile"
    for row in result["rows"]:
        assert row["ms"]["fast"] > 0 and row["ms"]["cudnn-on-cpu"] is None and row["ms"]["late"] is None
        assert row["vs_reference"]["late"] == {"failed": failed["late"]}
    assert "FAILED late: base: RuntimeError" in out.with_suffix(".md").read_text()


def test_bench_generation_reports_a_failing_row_and_goes_on(tmp_path, monkeypatch):
    import pidrt.engines.fast_torch as fast_torch

    make_fast = fast_torch.make_fast

    def broken(pipe, config, **kw):
        made = make_fast(pipe, config, **kw)
        made.generate = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("kernel does not compile"))
        return made

    monkeypatch.setattr(fast_torch, "make_fast", broken)
    out = tmp_path / "gen"
    assert _bench("bench_generation").main(["--out", str(out), "--preset", "tiny", "--device", "cpu",
                                            "--no-kernels", "--steps", "2", "--repeats", "1"]) == 0
    result = _outputs(out)
    assert result["meta"]["complete"]
    assert result["meta"]["failed"] == {f"pidrt-fast/{m}": "RuntimeError: kernel does not compile"
                                        for m in ("base", "ip", "sca")}
    assert {r["backend"] for r in result["rows"]} == {"diffusers", "pidrt-reference"}
    assert "FAILED pidrt-fast/sca" in out.with_suffix(".md").read_text()


def test_bench_generation_smoke(tmp_path):
    out = tmp_path / "gen"
    assert _bench("bench_generation").main(["--out", str(out), "--preset", "tiny", "--device", "cpu",
                                            "--no-kernels", "--steps", "2", "--repeats", "1"]) == 0
    result = _outputs(out)
    assert result["meta"]["complete"] and "INCOMPLETE" not in out.with_suffix(".md").read_text()
    got = {(r["backend"], r["method"]) for r in result["rows"]}
    assert got == {(b, m) for b in ("pidrt-fast", "pidrt-reference") for m in ("base", "ip", "sca")} | {
        ("diffusers", "base"), ("diffusers", "ip")}
    # Same modules, noise and scheduler: pidrt's images are diffusers' (fp32 on CPU).
    assert result["image_max_abs_diff"] and max(result["image_max_abs_diff"].values()) < 1e-4
    assert all(r["speedup_vs_baseline"] > 0 for r in result["rows"] if r["baseline"])


@pytest.mark.slow
def test_serve_load_smoke(tmp_path):
    """The served-path benchmark (gpu_session.sh served) end to end: a server process, the bare Generator."""
    out = tmp_path / "load"
    code = _bench("serve_load").main(["--backend", "torch", "--identities", "0", "--requests", "4",
                                       "--concurrency", "2", "--steps", "2", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "serve_load.json").read_text())
    torch_run = report["backends"]["torch"]
    assert torch_run["served"]["answers"] == {"200": 4} and torch_run["bare"]["answers"] == {"200": 4}
    assert torch_run["served"]["images_per_s"] > 0 and torch_run["bare"]["images_per_s"] > 0
    assert torch_run["torch_bytes"] > 0 and torch_run["server_ready_s"] > 0
    assert "| torch |" in (out / "serve_load.md").read_text()


def _session_dry_run(tmp_path, *args) -> tuple[list[tuple[str, int]], dict[str, str]]:
    """gpu_session.sh with DRY_RUN=1: ([(stage, limit s)], {stage: the timeout command it would run})."""
    import re
    import subprocess
    import sys

    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "out"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}  # python3: this venv's
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_session.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    stages = [(m[1], int(m[2])) for m in re.finditer(r"^=== (\S+) \(limit (\d+)s\)", done.stdout, re.MULTILINE)]
    commands = dict(zip([s for s, _ in stages], re.findall(r"^timeout .*$", done.stdout, re.MULTILINE)))
    return stages, commands


def test_gpu_session_stages_fit_the_lease(tmp_path):
    stages, commands = _session_dry_run(tmp_path)
    assert [s for s, _ in stages] == ["env", "pytest-gpu", "kernels", "unet-step", "generation"]
    assert sum(limit for _, limit in stages) < 560 and dict(stages)["env"] == 40
    pytest_stage = commands["pytest-gpu"]
    # SIGINT first: pytest then writes the JUnit report of what finished (SIGTERM leaves none).
    assert pytest_stage.startswith("timeout --signal=INT -k 15 180 python3 -m pytest -m gpu")
    assert "-rfE --durations=15" in pytest_stage and "--junitxml=" in pytest_stage
    assert ("--timeout=100" in pytest_stage) == (importlib.util.find_spec("pytest_timeout") is not None)
    root = BENCHMARKS.parent
    named = [w for w in pytest_stage.split() if w.startswith("tests/")]
    assert all((root / p).exists() for p in named) and "tests/runtime/test_eaa_feed.py" in named
    assert named[-1] == "tests/engines/test_fast_torch.py"  # its SD1.5 test, the slowest, runs last
    for name in ("kernels", "unet-step", "generation"):
        assert commands[name].startswith("timeout --signal=TERM -k 5 ")
        assert (root / commands[name].split()[6]).is_file()  # the benchmark script it runs
    assert "tests/engines/test_fused_norms.py" in named  # with `-m "gpu or on_device"`: compiled kernel tests
    for extra in ("tuning", "served", "retouch"):
        stages, extra_commands = _session_dry_run(tmp_path, extra)
        assert sum(limit for _, limit in stages) < 560, extra
    assert [s for s, _ in stages] == ["env", "retouch"]
    assert (root / extra_commands["retouch"].split()[6]).is_file() and "--preset sd15" in extra_commands["retouch"]


@pytest.mark.slow  # nine tiny retouches and generations: ~30 s on 2 busy cores
def test_bench_retouch_smoke(tmp_path, capsys):
    bench = _bench("bench_retouch")
    assert bench.main(["--out", str(tmp_path / "x"), "--device", "cpu"]) == 2  # sd15 on CPU
    assert "--preset tiny --device cpu" in capsys.readouterr().err
    stem = tmp_path / "r"
    assert bench.main(["--out", str(stem), "--preset", "tiny", "--device", "cpu", "--steps", "3", "--images", "1",
                       "--repeats", "1"]) == 0
    result = _outputs(stem)
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["inversion+rows"]["unet_calls"] == {"stage1": 3, "layout_inversion": 3, "stage2": 3}
    assert rows["recorded+cached"]["unet_rows"] == {"stage1": 6, "stage2": 6}
    assert rows["inversion+cached"]["vs_paper"]["max_abs"] < 1e-3  # the cache serves the same K/V

