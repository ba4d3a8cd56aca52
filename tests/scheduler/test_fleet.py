"""The fleet simulator: one replica is the simulator, the HPA model does the HPA's arithmetic, replicas start
late and drain without losing requests, and its default behaviour is the one the operator writes."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from optimist.engine.scheduler.fleet import (
    GENTLE,
    KUBERNETES_DEFAULT,
    Autoscaler,
    Fleet,
    FleetConfig,
    Phase,
    ScalingBehavior,
    phased_workload,
    pod_metric,
    simulate_fleet,
)
from optimist.engine.scheduler.policies import make_policy
from optimist.engine.scheduler.simulator import SimJob, SimServer, simulate
from optimist.engine.scheduler.workload import WorkloadRequest, paper_workload

BURST = [Phase(120, 4), Phase(240, 16), Phase(500, 3)]


def arrivals_workload(n: int, seed: int, gap: float) -> list[WorkloadRequest]:
    rng = np.random.default_rng(seed)
    steps = np.cumsum(rng.exponential(gap, n)).astype(int)
    base = paper_workload(n, seed, "noise:0.5")
    return [
        WorkloadRequest(r.id, int(step), r.prompt_tokens, r.output_tokens, r.lower, r.upper)
        for r, step in zip(base, steps.tolist(), strict=True)
    ]


@pytest.mark.parametrize("policy", ["amin", "amax", "fcfs", "amin-learned"])
@pytest.mark.parametrize("evict_cost", ["lost", "recompute"])
def test_one_replica_without_autoscaler_is_the_simulator(policy: str, evict_cost: str) -> None:
    work = arrivals_workload(150, seed=7, gap=3.0)
    alone = simulate(work, make_policy(policy), 1500, evict_cost=evict_cost, prefill_tokens_per_step=256)
    fleet = simulate_fleet(
        work, FleetConfig(memory=1500, policy=policy, evict_cost=evict_cost, prefill_tokens_per_step=256, step_s=1)
    )
    assert sorted(fleet.latencies_s) == sorted(alone.latencies)
    assert fleet.evictions == alone.evictions
    assert fleet.replica_seconds == fleet.duration_s == alone.makespan


def job(prompt: int, produced: int, bound: int, seq: int) -> SimJob:
    return SimJob(f"j{seq}", 0, prompt, 100, 1, 100, seq=seq, bound=bound, produced=produced)


def test_each_signal_is_what_the_sidecar_exports() -> None:
    server = SimServer(make_policy("amin"), memory=1000)
    server.running = [job(100, 20, 50, 0), job(50, 30, 10, 1)]
    server.waiting = [job(40, 0, 60, 2)]
    assert pod_metric("queueDepth", server) == 1
    assert pod_metric("concurrency", server) == 3
    assert pod_metric("kvUsage", server) == pytest.approx((120 + 80) / 1000)
    # prompt + planned output: the bound, or the tokens produced + 1 once past it
    assert pod_metric("lowerBoundDemand", server) == pytest.approx((100 + 50 + 50 + 31 + 40 + 60) / 1000)


def fleet_with(values: list[float], scaler: Autoscaler, step_s: float = 1.0) -> Fleet:
    fleet = Fleet(FleetConfig(memory=1000, replicas=len(values), step_s=step_s, autoscaler=scaler))
    set_samples(fleet, values, 0)
    return fleet


def set_samples(fleet: Fleet, values: list[float], t: int) -> None:
    for r, v in zip(fleet.active(), values, strict=True):
        r.samples = deque([(t, v)])


def test_hpa_scales_to_the_sum_over_the_target_within_its_policy() -> None:
    scaler = Autoscaler("queueDepth", 4, max_replicas=20, behavior=KUBERNETES_DEFAULT)
    fleet = fleet_with([8, 8], scaler)  # ratio 2: 4 replicas
    fleet._sync(0, scaler)
    assert len(fleet.active()) == 4
    fleet = fleet_with([40, 40], scaler)  # 20 wanted; 100% or 4 pods per 15 s: 6
    fleet._sync(0, scaler)
    assert len(fleet.active()) == 6
    assert fleet.timeline[-1]["recommendation"] == 20
    fleet = fleet_with([4.3, 4.3], scaler)  # within the 10% tolerance: no change
    fleet._sync(0, scaler)
    assert len(fleet.active()) == 2


def test_hpa_windows_and_rate_limits_of_a_gentle_behaviour() -> None:
    scaler = Autoscaler("queueDepth", 4, max_replicas=20, behavior=GENTLE)  # up: 30 s, 2 pods / 60 s; down: 1 / 120 s
    fleet = fleet_with([2, 2], scaler)
    fleet._sync(0, scaler)  # recommendation 1; the history starts at the current 2, which the down window keeps
    assert len(fleet.active()) == 2
    sizes = {}
    for t in range(15, 106, 15):  # every recommendation from t=15 on is 8
        set_samples(fleet, [16] * len(fleet.active()), t)
        fleet._sync(t, scaler)
        sizes[t] = len(fleet.active())
    # t=15: the 30 s window still holds t=0's; t=30: up by the policy's 2; then 2 pods per 60 s.
    assert sizes == {15: 2, 30: 4, 45: 4, 60: 4, 75: 4, 90: 6, 105: 6}
    t = 106
    set_samples(fleet, [16] * 6, t)
    fleet._sync(t, scaler)
    # Down: nothing for 300 s after the last high recommendation, then one pod per 120 s.
    t = 106
    sizes = []
    while t < 106 + 600:
        t += 15
        set_samples(fleet, [0.0] * len(fleet.active()), t)
        fleet._sync(t, scaler)
        sizes.append((t - 106, len(fleet.active())))
    first_down = next(dt for dt, n in sizes if n < 6)
    assert 300 <= first_down < 315
    assert [n for dt, n in sizes if dt == first_down + 105] == [5]
    assert [n for dt, n in sizes if dt == first_down + 120] == [4]


def test_new_replicas_get_requests_only_once_ready() -> None:
    config = FleetConfig(
        memory=4096,
        replicas=2,
        step_s=0.05,
        startup_s=45,
        autoscaler=Autoscaler("lowerBoundDemand", 0.9, max_replicas=10, behavior=KUBERNETES_DEFAULT),
    )
    fleet = Fleet(config)
    early: list[tuple[int, int]] = []
    add = fleet._add

    def watched_add(t: int, ready_at: int | None = None) -> None:
        add(t, ready_at)
        replica = fleet.replicas[-1]
        step = replica.server.step

        def checked(now: int) -> tuple[int, bool]:
            if now < replica.ready_at:
                early.append((replica.id, now))
            return step(now)

        replica.server.step = checked  # type: ignore[method-assign]

    fleet._add = watched_add  # type: ignore[method-assign]
    result = fleet.run(phased_workload(BURST, seed=3, step_s=0.05, intervals="noise:0.5"))
    assert result.peak_replicas > 2, "the burst must scale the fleet up"
    assert not early, f"replicas ran before they were ready: {early[:3]}"
    assert result.requests == len(result.latencies_s), "every request finishes"


@pytest.mark.parametrize(("grace_s", "resent"), [(0.0, True), (600.0, False)])
def test_scaling_down_drains_and_never_loses_a_request(grace_s: float, resent: bool) -> None:
    scaler = Autoscaler(
        "concurrency", 10, max_replicas=10, behavior=ScalingBehavior(down_window_s=15, down_pods=4, down_period_s=15)
    )
    config = FleetConfig(memory=4096, replicas=8, step_s=0.05, grace_s=grace_s, startup_s=30, autoscaler=scaler)
    work = phased_workload([Phase(200, 10, output_median=300)], seed=5, step_s=0.05, intervals="naive")
    result = simulate_fleet(work, config)
    assert result.scale_downs > 0
    assert result.requests == len(work) == len(result.latencies_s)
    assert (result.retried > 0) is resent
    assert min(result.latencies_s) > 0


def test_autoscaling_follows_a_burst_and_beats_the_same_start_left_alone() -> None:
    work = phased_workload(BURST, seed=1, step_s=0.05, intervals="noise:0.5")
    scaler = Autoscaler("lowerBoundDemand", 0.9, max_replicas=12, behavior=KUBERNETES_DEFAULT)
    scaled = simulate_fleet(work, FleetConfig(memory=8192, replicas=2, step_s=0.05, startup_s=30, autoscaler=scaler))
    alone = simulate_fleet(work, FleetConfig(memory=8192, replicas=2, step_s=0.05))
    assert scaled.peak_replicas >= 6
    replicas = [p["replicas"] for p in scaled.timeline]
    assert replicas[-1] < max(replicas), "the fleet shrinks after the burst"
    assert scaled.on_time > 0.9 and alone.on_time < 0.7


def test_the_default_behaviour_is_what_the_operator_writes() -> None:
    from optimist.operator import builders
    from optimist.operator.crd import defaulted_spec

    from ..operator.conftest import load_example, with_identity

    pool = with_identity(load_example("inferencepool.yaml"))
    pool["spec"]["autoscaling"] = {"mode": "hpa"}
    spec = defaulted_spec(pool["spec"])
    hpa = builders.build_hpa(pool, spec)
    assert ScalingBehavior.from_hpa(hpa["spec"]["behavior"]) == ScalingBehavior() == KUBERNETES_DEFAULT
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "optimist_lower_bound_kv_demand_ratio"
    assert ScalingBehavior.from_hpa({}) == KUBERNETES_DEFAULT
    from optimist.engine.bench.autoscale import DEFAULT_TARGETS

    assert {k: v for k, v in DEFAULT_TARGETS.items() if k in builders.DEFAULT_TARGETS} == builders.DEFAULT_TARGETS
    recipes = Path(__file__).resolve().parents[2] / "deploy" / "autoscaling"
    hpa_recipe = yaml.safe_load((recipes / "hpa.yaml").read_text())
    keda_recipe = yaml.safe_load((recipes / "keda-scaledobject.yaml").read_text())
    keda_behavior = keda_recipe["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert ScalingBehavior.from_hpa(hpa_recipe["spec"]["behavior"]) == ScalingBehavior(), "the recipe is measured"
    assert ScalingBehavior.from_hpa(keda_behavior) == ScalingBehavior()


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="metric must be one of"):
        Autoscaler("cpu", 0.5)
    with pytest.raises(ValueError, match="target must be positive"):
        Autoscaler("queueDepth", 0)
    with pytest.raises(ValueError, match="within the autoscaler"):
        FleetConfig(memory=100, replicas=9, autoscaler=Autoscaler("queueDepth", 4, max_replicas=4))
    with pytest.raises(ValueError, match="selectPolicy"):
        ScalingBehavior.from_hpa({"scaleUp": {"selectPolicy": "Disabled"}})
    with pytest.raises(ValueError, match="periodSeconds"):
        ScalingBehavior.from_hpa(
            {
                "scaleDown": {
                    "policies": [
                        {"type": "Pods", "value": 1, "periodSeconds": 60},
                        {"type": "Percent", "value": 10, "periodSeconds": 30},
                    ]
                }
            }
        )


def test_bench_autoscale_names_the_cheapest_target_per_signal(tmp_path: Path, capsys: Any) -> None:
    """A short burst: the demand ratio keeps 95% on time; KV usage at 0.9 (it saturates at 1) cannot."""
    from optimist.engine.cli import build_parser

    out = tmp_path / "autoscale.json"
    argv = ["bench", "autoscale", "--scenarios", "burst", "--intervals", "noise:0.5", "--behaviors", "operator"]
    argv += ["--signals", "lowerBoundDemand,kvUsage", "--targets", "lowerBoundDemand=0.9;kvUsage=0.9"]
    argv += ["--time-scale", "0.3", "--startup", "10", "--attainment", "0.95", "--jobs", "1", "--out", str(out)]
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    rows = {r["signal"]: r for r in report["summary"]}
    assert rows["lowerBoundDemand"]["target"] == 0.9 and rows["lowerBoundDemand"]["on_time"] >= 0.95
    assert rows["kvUsage"]["target"] is None and rows["kvUsage"]["on_time"] < 0.95
    static = sorted((r["target"], r["on_time"]) for r in report["runs"] if r["signal"] == "static")
    cheapest = rows["lowerBoundDemand"]["static_replicas"]
    assert all(on_time < 0.95 for n, on_time in static if n < cheapest), "the static baseline is the cheapest"
    assert dict(static)[cheapest] >= 0.95
    default = next(r for r in report["runs"] if r["signal"] == "lowerBoundDemand")["timeline"]
    assert max(default["replicas"]) > default["replicas"][0], "the default target's replicas over time are kept"
    assert "| burst | noise:0.5 | operator | lowerBoundDemand | 0.9 |" in capsys.readouterr().out


def test_bench_autoscale_rejects_unknown_names(capsys: Any) -> None:
    from optimist.engine.cli import build_parser

    parser = build_parser()
    for argv, named in (
        (["--scenarios", "spike"], "unknown scenario 'spike'"),
        (["--signals", "cpu"], "unknown signal 'cpu'"),
        (["--behaviors", "fast"], "unknown behavior 'fast'"),
        (["--targets", "cpu=1"], "SIGNAL=V1,V2"),
        (["--attainment", "1.5"], "(0, 1]"),
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", "autoscale", *argv])
        assert named in capsys.readouterr().err


def test_bench_autoscale_plays_a_trace(tmp_path: Path, capsys: Any) -> None:
    """Your own traffic (optimist simulate's JSON Lines) through the fleet: the trace's hints and arrivals."""
    from optimist.engine.cli import build_parser
    from optimist.engine.scheduler.workload import write_workload

    trace = tmp_path / "mytraffic.jsonl"
    write_workload(trace, phased_workload([Phase(60, 3), Phase(120, 12)], seed=2, step_s=0.05, intervals="noise:0.5"))
    out = tmp_path / "trace.json"
    argv = ["bench", "autoscale", "--workload", str(trace), "--signals", "lowerBoundDemand,queueDepth"]
    argv += ["--targets", "lowerBoundDemand=0.9;queueDepth=4", "--behaviors", "operator", "--startup", "10"]
    argv += ["--attainment", "0.9", "--router", "least-kv", "--jobs", "1", "--out", str(out)]
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert {(r["scenario"], r["intervals"]) for r in report["runs"]} == {("mytraffic", "file")}
    assert {r["router"] for r in report["runs"]} == {"least-kv"}
    scaled = [r for r in report["runs"] if r["signal"] != "static"]
    assert len(scaled) == 2 and all(r["requests"] == len(trace.read_text().splitlines()) for r in scaled)
    assert max(r["peak_replicas"] for r in scaled) > min(r["start"] for r in scaled), "the burst scales it up"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt_tokens": 9000, "output_tokens": 10}\n')
    for path, named in ((bad, "needs more than --memory 8192"), (tmp_path / "none.jsonl", "No such file")):
        args = build_parser().parse_args(["bench", "autoscale", "--workload", str(path), "--out", str(out)])
        with pytest.raises(SystemExit, match=named):
            args.func(args)


def test_memory_aware_routing_needs_fewer_replicas_than_round_robin(tmp_path: Path, capsys: Any) -> None:
    """`optimist bench routing`: a router that sees the replicas' KV memory keeps a burst on time with fewer
    replicas than gRPC's client-side round-robin."""
    from optimist.engine.cli import build_parser

    out = tmp_path / "routing.json"
    argv = ["bench", "routing", "--scenarios", "burst", "--intervals", "noise:0.5", "--attainment", "0.99"]
    argv += ["--routers", "round-robin,least-kv", "--time-scale", "0.3", "--jobs", "1", "--out", str(out)]
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    rows = {r["router"]: r for r in json.loads(out.read_text())["summary"]}
    assert rows["least-kv"]["replicas"] < rows["round-robin"]["replicas"]
    assert rows["round-robin"]["on_time_at_fewest"] < 0.99 <= rows["least-kv"]["on_time_at_fewest"]
    assert "| burst | noise:0.5 | least-kv |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="router must be one of"):
        FleetConfig(memory=100, router="fastest")
