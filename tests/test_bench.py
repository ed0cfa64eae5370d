"""Smoke tests of the benchmark suite in the repository's bench/ folder, on tiny
configurations: its verification, its ONNX graph, its tables and targets, its GEMM peak,
its memory probe and one whole run. No timing is asserted: speed is measured by bench/,
never by tests (docs/benchmarking.md). Peers that are not installed are skipped by the
suite itself; these tests check that."""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)       # bench/ is not a package: its modules import each other

import cases  # noqa: E402
import peer_onnxruntime  # noqa: E402
import peer_torch  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import targets  # noqa: E402
import timing  # noqa: E402
from memprobe import measure_memory  # noqa: E402
from problem import make_problem  # noqa: E402

HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None and \
    importlib.util.find_spec("onnx") is not None
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
if os.environ.get("CYLSTM_REQUIRE_BENCH") and not (HAVE_ORT and HAVE_MPL):
    # CI installs the bench extra: there a missing peer is an error, not a skip
    raise ImportError("CYLSTM_REQUIRE_BENCH is set but onnx/onnxruntime/matplotlib are "
                      "not installed")
if os.environ.get("CYLSTM_REQUIRE_TORCH", "") not in ("", "0") and not HAVE_TORCH:
    raise ImportError("CYLSTM_REQUIRE_TORCH is set but torch is not installed")

# Unit-sized stand-ins for the benchmark's configurations: two layers (the ONNX graph chains
# nodes), B > 1 (lengths differ), and a one-layer streaming step.
UNIT = cases.Config(3, 7, 5, 6, 2, "unit")
UNIT_STEP = cases.Config(2, 1, 5, 6, 1, "unit step", state=True)
# Keep the whole run short: one tiny rep per block, no settling, small GEMMs.
SMOKE = cases.QUICK._replace(target=0.001, warm=0.0, rounds=1, settle=0.0, gemm_reps=1,
                             gemm_seconds=0.0)


@pytest.fixture(autouse=True)
def unit_configs(monkeypatch):
    monkeypatch.setitem(cases.CONFIGS, "unit", UNIT)
    monkeypatch.setitem(cases.CONFIGS, "unitstep", UNIT_STEP)
    monkeypatch.setattr(cases, "GEMM_SIZES", (32, 64))


def verify(case):
    prob = make_problem(case)
    impls, skipped = peers.build_impls(case, prob, list(peers.PEERS), report.Sink(None))
    checks = peers.verify_case(case, impls, prob.data, [1, 2], cases.TASKS,
                               cases.TOLERANCE[case.dtype])
    return impls, skipped, checks


@pytest.mark.parametrize("case", [cases.Case("unit"), cases.Case("unitstep")] +
                         [cases.Case("unit", v) for v in cases.VARIANTS], ids=str)
def test_every_implementation_verifies(case):
    impls, skipped, checks = verify(case)
    assert not [c for c in checks if not c[3]["ok"]]
    ran = {name for name, _, _, _ in checks}
    assert ran == {k for k, impl in impls.items() if not impl.verified_by}
    assert {"cylstm", "reference"} <= ran
    assert ("cylstm-full" in impls) == (case.variant == "varlen")   # the varlen target's twin
    assert ("torch" in ran) == HAVE_TORCH
    ort_can = HAVE_ORT and case.variant not in ("float64", "proj")
    assert ("onnxruntime" in ran) == ort_can
    if not ort_can:
        assert "onnxruntime" in skipped
    for name, n, task, r in checks:         # every gradient is compared, not just y
        if task == "training" and name != "onnxruntime":
            assert {"y", "dx", "dweight_ih_l0", "dweight_hh_l1"} <= set(r["errors"])


@pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime/onnx not installed")
def test_verification_catches_a_wrong_gate_order(monkeypatch):
    monkeypatch.setattr(peer_onnxruntime, "onnx_gates", lambda w, H: w)   # torch's order, unconverted
    _, _, checks = verify(cases.Case("unit"))
    ort = [r for name, _, _, r in checks if name == "onnxruntime"]
    assert ort and not any(r["ok"] for r in ort)


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_torch_paths_are_told_apart():
    impls, _, _ = verify(cases.Case("unit"))
    assert impls["torch"].uses_onednn == {"inference": True, "training": True}
    assert impls["torch-native"].uses_onednn == {"inference": False, "training": False}
    impls, _, _ = verify(cases.Case("unit", "float64"))     # oneDNN: float32 only
    assert impls["torch"].uses_onednn == {"inference": False, "training": False}


def test_absent_peers_are_skipped_with_a_note(monkeypatch):
    monkeypatch.setattr(peer_torch.Torch, "needs", "no_such_module_torch")
    monkeypatch.setattr(peer_onnxruntime.Ort, "needs", "no_such_module_ort")
    impls, skipped, _ = verify(cases.Case("unit"))
    assert set(impls) == {"cylstm", "reference"}
    assert all("not installed" in skipped[p] for p in ("torch", "torch-native", "onnxruntime"))


def fake_rows(ms):
    """Rows as _time_cell makes them, from {(case, task, threads, impl): median ms}."""
    rows = {}
    for (case, task, n, impl), t in ms.items():
        row = rows.setdefault((case, task, n), {"case": case, "task": task, "threads": n,
                                                "stats": {}, "load": 0.0, "skipped": {},
                                                "flops": 1e9})
        row["stats"][impl] = {"median_ms": t, "p25_ms": t, "p75_ms": t, "reps": 3}
    return list(rows.values())


def test_targets_met_missed_and_unmeasured():
    rows = fake_rows({("medium", "training", 2, "cylstm"): 10.0,
                      ("medium", "training", 2, "torch"): 20.0,          # 2x: met (1.25)
                      ("medium", "training", 2, "torch-native"): 11.0,   # faster path: 1.1x
                      ("small", "inference", 2, "cylstm"): 10.0,
                      ("small", "inference", 2, "onnxruntime"): 11.0,    # 1.1x < 1.2
                      ("step", "inference", 2, "cylstm"): 0.008})        # 8 us
    met = {t["what"]: t for t in targets.evaluate_targets(
        rows, {2: 100.0}, [cases.Case("medium"), cases.Case("small")], [1, 2])}
    assert met["training vs torch, medium"]["met"] is False          # against 1.1x
    assert met["training vs torch, medium"]["measured"] == "1.10x"
    assert met["inference vs ONNX Runtime, small"]["met"] is False
    assert met["streaming step (B=1, H=256)"]["met"] is True
    assert met["training vs torch, large"]["met"] is None
    lines = report._target_lines(list(met.values()))
    assert any("**MISSED**" in s for s in lines) and any("| MET |" in s for s in lines)
    assert any(s.startswith("Not measured in this run:") for s in lines)


def test_timing_table_has_a_ratio_per_peer():
    rows = fake_rows({("unit", "inference", 1, "cylstm"): 2.0,
                      ("unit", "inference", 1, "reference"): 8.0,
                      ("unit", "inference", 1, "torch"): 1.0})
    lines = report._timing_lines(rows, ["reference", "torch"], {1: 1000.0})
    head = [s for s in lines if s.startswith("| case")][0]
    assert "x NumPy ref" in head and "x torch" in head
    body = [s for s in lines if s.startswith("| unit")][-1]
    assert "| 4.00x |" in body and "| **0.50x** |" in body


def test_onnx_gate_order():
    H = 2
    w = np.repeat(np.arange(4), H)[:, None]          # gate k's rows hold k: i=0 f=1 g=2 o=3
    assert peer_onnxruntime.onnx_gates(w, H)[::H, 0].tolist() == [0, 3, 1, 2]   # ONNX: i o f c


def test_memory_probe_reports_bytes():
    got = measure_memory("cylstm", cases.Case("tiny"), 1)
    assert isinstance(got, int) and got >= 0, got


def test_end_to_end_writes_report_json_and_chart(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cases, "QUICK", SMOKE)
    rc = run.main(["--quick", "--configs", "unit,unitstep", "--variants", "varlen,bidir",
                      "--variant-configs", "unit", "--threads", "1,2", "--no-memory",
                      "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    md = (tmp_path / "latest.md").read_text()
    assert md.strip() in out
    for section in ("## Verification", "## Timings", "## Targets", "thread pools"):
        assert section in md
    records = [json.loads(s) for s in (tmp_path / "latest.jsonl").read_text().splitlines()]
    types = {r["type"] for r in records}
    assert {"header", "gemm_peak", "verification", "timing", "end"} <= types
    timed = {(r["case"], r["task"], r["threads"], r["impl"]) for r in records
             if r["type"] == "timing" and "skipped" not in r}
    assert ("unit/bidir", "training", 2, "cylstm") in timed
    assert ("unitstep", "inference", 1, "cylstm") in timed
    assert all(r["ok"] for r in records if r["type"] == "verification")
    if HAVE_MPL:
        assert (tmp_path / "latest.png").read_bytes()[:4] == b"\x89PNG"


def test_gemm_peak_is_the_best_over_sizes_and_routes():
    got = timing.gemm_peak(np.float32, 1, reps=2, sizes=(32, 64), seconds=0.0)
    assert {(r["size"], r["route"]) for r in got["runs"]} == \
        {(32, "scipy"), (32, "numpy"), (64, "scipy"), (64, "numpy")}
    assert got["gflops"] == max(r["gflops"] for r in got["runs"]) > 0
    assert all(r["reps"] >= 2 for r in got["runs"])


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_torch_profiler_check_prints_nothing(capfd):
    impls, _, _ = verify(cases.Case("unit"))          # runs the profiler check
    out, err = capfd.readouterr()
    assert "USDT" not in out + err and "profiler" not in out + err


def test_results_go_next_to_the_script_by_default():
    assert run.DEFAULT_OUT == os.path.join(BENCH, "results")
    args = run.add_arguments(__import__("argparse").ArgumentParser()).parse_args([])
    assert args.out == run.DEFAULT_OUT


# ---- bench/e2e.py: end-to-end throughput, on tiny models (--smoke) --------------------------

import e2e  # noqa: E402


def test_e2e_smoke_writes_every_section(tmp_path, capsys):
    assert e2e.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    md = (tmp_path / "e2e.md").read_text()
    assert md.strip() in out
    for section in ("## Throughput", "## python -m cylstm train", "BLAS kernels"):
        assert section in md
    assert "Did not run" not in md                     # the train subprocess worked
    run_rec = json.loads((tmp_path / "e2e.jsonl").read_text().splitlines()[0])
    res = run_rec["results"]
    for key in ("fit_char", "fit_cls", "predict_char", "predict_cls", "evaluate_char",
                "evaluate_cls", "sample"):
        assert res[key]["cylstm"]["median"] > 0
        assert ("torch" in res[key]) == HAVE_TORCH
    assert res["train"]["chars_per_s"] > 0
    owners = {k["owner"] for k in run_rec["header"]["blas_kernels"]}
    assert {"numpy", "scipy"} <= owners and ("torch" in owners) == HAVE_TORCH
    if HAVE_TORCH:
        assert "## Targets" in md and len(run_rec["targets"]) == len(e2e.TARGETS)


def test_e2e_profile_groups_fit_by_piece(tmp_path, capsys):
    assert e2e.main(["--smoke", "--profile", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "e2e_profile.md").read_text()
    rec = json.loads((tmp_path / "e2e_profile.jsonl").read_text().splitlines()[0])
    pieces = {r["piece"]: r for r in rec["profile"]["rows"]}
    assert len(pieces) == 5 and "Embedding + LSTM forward + backward" in md
    for r in pieces.values():                  # every piece was found inside fit
        assert r["calls_per_update"] >= 1 and r["inside_ms"] > 0 and r["alone_ms"] > 0
        assert r["after_lstm_ms"] > 0 and "| after the LSTM ms |" in md


@pytest.mark.parametrize("what", ["predict", "evaluate"])
def test_e2e_profile_groups_inference_by_piece(what, tmp_path, capsys):
    assert e2e.main(["--smoke", "--profile", what, "--out", str(tmp_path)]) == 0
    md = (tmp_path / f"e2e_profile_{what}.md").read_text()
    rec = json.loads((tmp_path / f"e2e_profile_{what}.jsonl").read_text().splitlines()[0])
    p = rec["inference_profile"]
    assert p["what"] == what and f"# cylstm {what} profile" in md
    pieces = {r["piece"]: r for r in p["rows"]}
    assert ("loss and metrics (softmax cross-entropy)" in pieces) == (what == "evaluate")
    for k, r in pieces.items():                # every piece was found inside the call
        assert r["calls_per_batch"] > 0 and r["inside_ms"] > 0, k
        if k != "LSTM.forward_batch around the kernel (layout copies, checks)":
            assert r["alone_ms"] > 0, k        # (that one is a difference of two medians)
        if HAVE_TORCH and "Embedding" in k:
            assert r["torch_ms"] > 0
    assert p["ms_per_batch"] > 0 and (p["torch_ms_per_batch"] is not None) == HAVE_TORCH


def test_e2e_runs_each_blas_environment_in_a_child(tmp_path, capsys):
    assert e2e.main(["--smoke", "--no-train", "--no-torch", "--blas-env", "unset,haswell",
                     "--out", str(tmp_path)]) == 0
    recs = [json.loads(s) for s in (tmp_path / "e2e.jsonl").read_text().splitlines()]
    env = {r["blas_env"]: r["header"]["env"] for r in recs}
    assert env["unset"]["OPENBLAS_CORETYPE"] is None
    assert env["haswell"] == dict(env["haswell"], OPENBLAS_CORETYPE="Haswell",
                                  OPENBLAS_L2_SIZE="512")
    assert "# BLAS environments compared" in (tmp_path / "e2e.md").read_text()


def test_checkpoint_bench_reports_time_and_memory_per_variant(capsys):
    import checkpoint
    checkpoint.main(["--smoke", "--threads", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| smoke")]
    assert len(rows) == len(checkpoint.VARIANTS)
    full, *ckpt = [row.split("|") for row in rows]
    assert full[2].strip() == "None" and full[7].strip() == "1.00x"
    for row in ckpt:                              # really checkpointed: k < T
        assert int(row[3]) < 40 and float(row[8]) > 0


def test_rgemm_rows_times_every_level_and_row_count(capsys):
    import rgemm_rows
    from cylstm import _isa
    args = ["--shape", "40", "7", "--rows", "1-3,9", "--rounds", "1", "--seconds", "0.001",
            "--dtype", "float64"]
    levels = _isa.cpu_level()          # 1 AVX2, 2 AVX-512: that many tables
    if levels == 0:                    # no packed kernel: says so, times nothing
        with pytest.raises(SystemExit, match="no packed kernel"):
            rgemm_rows.main(args)
        return
    rgemm_rows.main(args)
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ")
            and line[2].isdigit()]
    assert [int(r[1]) for r in rows] == [1, 2, 3, 9] * levels
    assert all(float(r[2]) > 0 and float(r[3]) > 0 and float(r[4]) > 0 for r in rows)
    assert out.count("(level ") == levels


def test_varlen_rows_reports_the_curve_and_both_shares(capsys):
    import varlen_rows
    varlen_rows.main(["--shape", "12", "6", "3", "8", "--rounds", "1", "--reps", "1"])
    out = capsys.readouterr().out
    heads = {f"| {m}" for m in range(1, 4)}
    rows = [line.split("|") for line in out.splitlines() if line[:3] in heads]
    assert [int(r[1]) for r in rows] == [1, 2, 3]            # m = 1 .. B/2
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)
    for what in ("predicted from the curve", "measured, 2 threads"):
        line = next(line for line in out.splitlines() if what in line)
        share = float(line.split(": ")[1].split("%")[0])
        assert 0 < share < 1000, line
