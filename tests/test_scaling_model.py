"""Invariants of the thread-scaling model in bench/scaling_model.py (docs/scaling.md):
its accounting (every part's flops and bytes add up to the whole), its decompositions
(every part computed once, teams no larger than threads or parts), and its speed-ups
(never above the thread count on a machine without a cache hierarchy to exploit). No
timing: the model is evaluated on its stated defaults, never calibrated here."""
import dataclasses
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))

import scaling_model as sm  # noqa: E402

SHAPES = [sm.Shape(256, 1), sm.Shape(256, 8, training=True), sm.Shape(1024, 64),
          sm.Shape(1024, 8, training=True), sm.Shape(100, 7, T=13, I=37, training=True)]
THREADS = (1, 3, 8, 16, 64)


def flat(m, cores):
    """The same machine with one memory level: every byte costs the same wherever it
    comes from, and synchronisation is free."""
    bw = m.bw_l3
    return dataclasses.replace(m, cores=cores, bw_l2=bw, bw_l3=bw, bw_dram_core=bw,
                               bw_dram=bw * cores, hop_s=0.0)


def plans(s, n, m):
    return [sm.today_plan(s, n), sm.design_plan(s, n, dataclasses.replace(m, cores=n))]


@pytest.mark.parametrize("s", SHAPES)
@pytest.mark.parametrize("n", THREADS)
def test_parts_add_up_to_the_whole(s, n):
    m = sm.Machine(cores=n)
    for plan in plans(s, n, m):
        _, ph = sm.predict(s, m, n, n, plan)
        _, flops, wbytes, team = ph["forward loop"]
        assert sum(flops) == 2 * s.B * s.G * s.H          # one step's h W_hh^T
        # each batch group reads W_hh once per step, cut between its unit parts
        assert sum(wbytes) == plan.n_b * s.G * s.H * sm.F32
        assert 1 <= team <= min(n, plan.n_b * plan.n_u)
        gemms = {"input projection": (s.T * s.B, s.G, s.In, plan.proj)}
        if s.training:
            gemms["weight gradients"] = (s.G, s.In + s.H, s.T * s.B, plan.wgrad)
            gemms["dx"] = (s.T * s.B, s.In, s.G, plan.dx)
        for name, (M, N, K, (rb, cb)) in gemms.items():
            _, flops, byts = ph[name]
            assert len(flops) == rb * cb <= n
            assert sum(flops) == 2 * M * N * K
            # A is read once per column block, B once per row block, C written once
            assert sum(byts) == (cb * M * K + rb * K * N + M * N) * sm.F32


@pytest.mark.parametrize("parts", [1, 5, 8, 64])
@pytest.mark.parametrize("threads", [1, 2, 3, 8, 100])
def test_every_part_has_one_owner(parts, threads):
    teams = sm.owners(parts, threads)
    assert len(teams) == min(parts, threads)
    assert sorted(p for mine in teams for p in mine) == list(range(parts))
    assert max(map(len, teams)) - min(map(len, teams)) <= 1


@pytest.mark.parametrize("s", SHAPES)
def test_parts_do_not_depend_on_the_thread_count(s):
    # The bitwise rule: parts come from shapes and n_parts; a smaller team only takes
    # several parts each, so every part's work is the same for any thread count.
    m = sm.Machine(cores=64)
    for plan in plans(s, 64, m):
        runs = [sm.predict(s, m, n, 64, plan)[1] for n in (1, 3, 8, 64)]
        for name in runs[0]:
            assert all(r[name][1:3] == runs[0][name][1:3] for r in runs), name


@pytest.mark.parametrize("s", SHAPES)
@pytest.mark.parametrize("n", THREADS[1:])
def test_no_superlinear_speed_up_without_caches(s, n):
    m = flat(sm.Machine(), n)
    one = sm.predict(s, m, 1, 1, sm.today_plan(s, 1))[0]
    for plan in plans(s, n, m):
        assert one / sm.predict(s, m, n, n, plan)[0] <= n * (1 + 1e-9)


@pytest.mark.parametrize("s", SHAPES)
def test_synchronisation_only_costs(s):
    m = sm.Machine(cores=64)
    free = dataclasses.replace(m, hop_s=0.0)
    for plan in plans(s, 64, m):
        assert sm.predict(s, m, 64, 64, plan)[0] >= sm.predict(s, free, 64, 64, plan)[0]


def test_small_batch_on_many_cores_leaves_today_threads_idle():
    # n_chunks = min(B, n_parts): B = 8 on 64 cores runs the time loop on 8 threads
    s, m = sm.Shape(1024, 8), sm.Machine(cores=64)
    assert sm.predict(s, m, 64, 64, sm.today_plan(s, 64))[1]["forward loop"][3] == 8
    plan = sm.design_plan(s, 64, m)
    assert plan.n_b * plan.n_u > 8 and plan.n_u > 1
    assert sm.predict(s, m, 64, 64, plan)[1]["forward loop"][3] > 8


def test_design_is_never_slower_than_today_in_the_table():
    for s in sm.SHAPES:
        _, sp = sm.speedups(s, sm.Machine())
        for n in (8, 16, 64):
            assert sp["design", n] >= sp["today", n] * 0.99, (s, n)


def test_script_prints_the_table(capsys):
    sm.main(["--no-calibrate"])
    out = capsys.readouterr().out
    assert "| 1024 | 256 | training |" in out and "design x64" in out
    assert "not calibrated" in out
