"""Fleet simulator: replicas of one server behind a router, scaled by a model of the Kubernetes HPA on one
per-pod metric. It exists to answer which signal an InferencePool should scale on, and with which target.

What it models, because each of these decides how well autoscaling works:
- the replicas: each one the simulator's server (`SimServer`: the same policy objects as the engine, memory in
  tokens, time in steps of `step_s` seconds), a new one ready only after `startup_s` (model loading), a removed
  one draining: it takes no new requests, finishes what it has for up to `grace_s`, and the requests it still
  holds then are aborted and sent again by the client (from scratch, their latency counted from the first send);
- the router: each arrival goes to a ready replica, by default the one with the fewest requests (waiting +
  running; `ROUTERS` lists the others), seeing the replicas' state as it is;
- the metric pipeline: Prometheus scrapes every pod's sidecar every `scrape_s`; prometheus-adapter turns the last
  `window_s` of samples into one value per pod (`max_over_time` for the demand ratio, `avg_over_time` for the
  others: the chart's rules); terminating pods are not counted;
- the HPA (`pkg/controller/podautoscaler` semantics): every `sync_s`, recommendation = ceil(sum of pod values /
  target), none within the 10% tolerance; scale-up takes the smallest recommendation of its stabilisation window
  and scale-down the largest of its own; changes are rate-limited per period (Pods policies); min/max replicas.
  The defaults are the behaviour the operator writes into every HPA and ScaledObject it builds (a test keeps
  them equal). KEDA's Prometheus trigger computes the same desired count (ceil(sum / threshold)).

The signals, per pod (what the sidecar exports):
- `lowerBoundDemand`: prompt plus planned output (A_min's bound, at least the tokens produced + 1) of every running
  and waiting request, over KV capacity — the scheduler's own view of how much memory its work needs;
- `queueDepth`: waiting requests; `concurrency`: waiting + running requests (KServe/Knative's concurrency);
- `kvUsage`: KV tokens held over capacity (vLLM's `kv_cache_usage_perc`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .policies import make_policy
from .simulator import SimJob, SimServer, SimulationError, make_jobs, percentile
from .workload import WorkloadRequest, interval, lognormal_lengths

SIGNALS = ("lowerBoundDemand", "queueDepth", "concurrency", "kvUsage")
# How an arrival picks a ready replica: round-robin (gRPC's client-side policy over the headless Service), random
# (a connection-level balancer, per request here), least-requests (Envoy's LEAST_REQUEST: waiting + running),
# least-kv (fewest waiting, then the lowest KV usage: what the Gateway API Inference Extension's endpoint picker
# reads from the sidecar's vllm: series), least-demand (the lowest demand ratio).
ROUTERS = ("round-robin", "random", "least-requests", "least-kv", "least-demand")
AGGREGATION = {"lowerBoundDemand": "max", "queueDepth": "avg", "concurrency": "avg", "kvUsage": "avg"}


@dataclass(frozen=True)
class ScalingBehavior:
    """The HPA's `behavior`: a stabilisation window per direction and per direction a Pods and/or a Percent
    policy over one period (selectPolicy Max: the policy that allows the larger change wins). The defaults are
    the HPA's own when a spec gives none, which is also what the operator writes (a test keeps them equal)."""

    up_window_s: float = 0.0
    up_pods: int = 4
    up_percent: float = 100.0
    up_period_s: float = 15.0
    down_window_s: float = 300.0
    down_pods: int = 0
    down_percent: float = 100.0
    down_period_s: float = 15.0

    def up_limit(self, at_period_start: int) -> int:
        by_percent = math.ceil(at_period_start * (1 + self.up_percent / 100)) if self.up_percent else 0
        return max(at_period_start + self.up_pods, by_percent)

    def down_limit(self, at_period_start: int) -> int:
        by_percent = math.floor(at_period_start * (1 - self.down_percent / 100)) if self.down_percent else None
        by_pods = at_period_start - self.down_pods if self.down_pods else None
        limits = [x for x in (by_percent, by_pods) if x is not None]
        return min(limits) if limits else at_period_start

    @classmethod
    def from_hpa(cls, behavior: dict[str, Any]) -> ScalingBehavior:
        """From an HPA v2 `spec.behavior` (what the operator writes, or your own): both directions' windows and
        Pods/Percent policies; the policies of a direction must share one period and select Max. What it leaves
        out is the HPA's default."""
        fields: dict[str, Any] = dict(KUBERNETES_DEFAULT.__dict__)
        for direction, prefix in (("scaleUp", "up"), ("scaleDown", "down")):
            rules = behavior.get(direction)
            if rules is None:
                continue
            fields[f"{prefix}_window_s"] = float(rules.get("stabilizationWindowSeconds", fields[f"{prefix}_window_s"]))
            if rules.get("selectPolicy", "Max") != "Max":
                raise ValueError(f"{direction}.selectPolicy: only Max is modelled, got {rules['selectPolicy']!r}")
            policies = rules.get("policies")
            if not policies:
                continue
            periods = {p["periodSeconds"] for p in policies}
            if len(periods) != 1:
                raise ValueError(f"{direction}.policies: one periodSeconds for all is modelled, got {sorted(periods)}")
            fields[f"{prefix}_period_s"] = float(periods.pop())
            fields[f"{prefix}_pods"] = max((int(p["value"]) for p in policies if p["type"] == "Pods"), default=0)
            fields[f"{prefix}_percent"] = max(
                (float(p["value"]) for p in policies if p["type"] == "Percent"), default=0
            )
        return cls(**fields)


KUBERNETES_DEFAULT = ScalingBehavior()  # the operator writes the HPA's own default out in full
GENTLE = ScalingBehavior(
    up_window_s=30.0,
    up_pods=2,
    up_percent=0.0,
    up_period_s=60.0,
    down_window_s=300.0,
    down_pods=1,
    down_percent=0.0,
    down_period_s=120.0,
)  # the operator's behaviour before session 22: 2 pods / 60 s up, 1 pod / 120 s down


@dataclass(frozen=True)
class Autoscaler:
    metric: str
    target: float
    min_replicas: int = 1
    max_replicas: int = 8
    behavior: ScalingBehavior = ScalingBehavior()
    tolerance: float = 0.1
    sync_s: float = 15.0
    scrape_s: float = 15.0
    window_s: float = 60.0

    def __post_init__(self) -> None:
        if self.metric not in SIGNALS:
            raise ValueError(f"metric must be one of {', '.join(SIGNALS)}, got {self.metric!r}")
        if not self.target > 0:
            raise ValueError(f"target must be positive, got {self.target}")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"replicas must satisfy 1 <= min ({self.min_replicas}) <= max ({self.max_replicas})")
        for name in ("sync_s", "scrape_s", "window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")


@dataclass(frozen=True)
class FleetConfig:
    memory: int  # KV tokens per replica
    policy: str = "amin"
    evict_cost: str = "recompute"  # the engine's model: an evicted request keeps its tokens
    prefill_tokens_per_step: float = math.inf
    step_s: float = 0.05
    startup_s: float = 60.0
    grace_s: float = 30.0
    replicas: int = 1  # at the start (and throughout, without an autoscaler)
    router: str = "least-requests"
    autoscaler: Autoscaler | None = None
    # A request is on time when its first token comes within slo_ttft_s of its (first) arrival and its last
    # within slo_ttft_s + slo_tpot_s per output token (goodput's definition).
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.1
    max_steps: int = 10_000_000

    def __post_init__(self) -> None:
        if self.memory < 1:
            raise ValueError(f"memory must be positive, got {self.memory}")
        if not self.step_s > 0:
            raise ValueError(f"step_s must be positive, got {self.step_s}")
        if self.startup_s < 0 or self.grace_s < 0:
            raise ValueError("startup_s and grace_s must not be negative")
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        scaler = self.autoscaler
        if scaler is not None and not scaler.min_replicas <= self.replicas <= scaler.max_replicas:
            raise ValueError(
                f"the starting replicas ({self.replicas}) must be within the autoscaler's "
                f"[{scaler.min_replicas}, {scaler.max_replicas}]"
            )

    def steps(self, seconds: float) -> int:
        return max(1, round(seconds / self.step_s))


def pod_metric(metric: str, server: SimServer) -> float:
    """One pod's instantaneous value of a signal, as its sidecar exports it."""
    if metric == "queueDepth":
        return float(len(server.waiting))
    if metric == "concurrency":
        return float(len(server.waiting) + len(server.running))
    if metric == "kvUsage":
        return server.held() / server.memory
    demand = sum(j.prompt_len + max(j.bound, j.produced + 1) for j in (*server.running, *server.waiting))
    return demand / server.memory


@dataclass(eq=False)
class Replica:
    id: int
    server: SimServer
    created: int
    ready_at: int
    busy_until: int = 0
    draining_since: int | None = None
    gone_at: int | None = None
    samples: deque[tuple[int, float]] = field(default_factory=deque)

    def ready(self, t: int) -> bool:
        return self.draining_since is None and t >= self.ready_at

    def load(self) -> int:
        return len(self.server.waiting) + len(self.server.running)


@dataclass
class FleetResult:
    requests: int
    step_s: float
    mean_latency_s: float
    p50_latency_s: float
    p99_latency_s: float
    mean_queue_s: float  # arrival to first admission: about the time to first token
    p99_queue_s: float
    on_time: float  # share of requests within the SLO (FleetConfig.slo_*)
    replica_seconds: float  # every replica from creation to removal (starting and draining ones cost too)
    mean_replicas: float
    peak_replicas: int
    scale_ups: int
    scale_downs: int
    evictions: int
    retried: int  # requests aborted at the end of a drain and sent again
    duration_s: float
    timeline: list[dict[str, float]] = field(default_factory=list, repr=False)
    latencies_s: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k not in ("timeline", "latencies_s")}


class Fleet:
    """The replicas, the router and the autoscaler; `run` plays a workload through them."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.replicas: list[Replica] = []
        self.removed: list[Replica] = []
        self.held: list[SimJob] = []  # arrivals (and retries) waiting for a ready replica
        self.recommendations: deque[tuple[int, int]] = deque()
        self.changes: deque[tuple[int, int]] = deque()  # (step, replicas added (+) or removed (-))
        self.timeline: list[dict[str, float]] = []
        self.retried = 0
        self.scale_ups = self.scale_downs = 0
        self._next_id = 0
        self._rr = -1
        self._rng = np.random.default_rng(0)
        for _ in range(config.replicas):
            self._add(0, ready_at=0)

    # --- replicas ---------------------------------------------------------------------------------------------

    def _add(self, t: int, ready_at: int | None = None) -> None:
        c = self.config
        server = SimServer(make_policy(c.policy), c.memory, c.evict_cost, c.prefill_tokens_per_step)
        start = t + c.steps(c.startup_s) if ready_at is None else ready_at
        self.replicas.append(Replica(self._next_id, server, created=t, ready_at=start, busy_until=t))
        self._next_id += 1

    def active(self) -> list[Replica]:
        """Replicas the Deployment counts: starting or ready, not terminating."""
        return [r for r in self.replicas if r.draining_since is None]

    def _remove(self, t: int, count: int) -> None:
        """Scale down by `count`: pods still starting go first, then the most recently ready ones (newest first,
        as a ReplicaSet chooses); a ready one with requests drains."""
        active = self.active()
        starting = sorted((r for r in active if r.ready_at > t), key=lambda r: r.created, reverse=True)
        ready = sorted((r for r in active if r.ready_at <= t), key=lambda r: r.ready_at, reverse=True)
        for r in (starting + ready)[:count]:
            if r.ready_at > t or not r.server.busy:
                self._retire(r, t)
            else:
                r.draining_since = t

    def _retire(self, r: Replica, t: int) -> None:
        r.gone_at = t
        self.replicas.remove(r)
        self.removed.append(r)

    def _abort_drained(self, r: Replica, t: int) -> None:
        """The grace period is over: the replica's requests are aborted, and their clients send them again."""
        for job in (*r.server.running, *r.server.waiting):
            job.wasted_tokens += job.prompt_len + job.produced
            job.produced = 0
            job.bound = job.lower
            job.needs_prefill = True
            self.retried += 1
            self.held.append(job)
        r.server.running, r.server.waiting = [], []
        self._retire(r, t)

    # --- routing ----------------------------------------------------------------------------------------------

    def _dispatch(self, t: int) -> None:
        if not self.held:
            return
        ready = [r for r in self.replicas if r.ready(t)]
        if not ready:
            return
        for job in self.held:
            target = self._route(ready)
            target.server.waiting.append(job)
        self.held = []

    def _route(self, ready: list[Replica]) -> Replica:
        router = self.config.router
        if router == "round-robin":
            self._rr += 1
            return ready[self._rr % len(ready)]
        if router == "random":
            return ready[int(self._rng.integers(len(ready)))]
        if router == "least-demand":
            return min(ready, key=lambda r: (pod_metric("lowerBoundDemand", r.server), r.id))
        if router == "least-kv":
            return min(ready, key=lambda r: (len(r.server.waiting), pod_metric("kvUsage", r.server), r.id))
        return min(ready, key=lambda r: (r.load(), r.id))

    # --- the autoscaler -----------------------------------------------------------------------------------------

    def _scrape(self, t: int, scaler: Autoscaler) -> None:
        horizon = t - self.config.steps(scaler.window_s)
        for r in self.active():
            r.samples.append((t, pod_metric(scaler.metric, r.server)))
            while r.samples and r.samples[0][0] <= horizon:
                r.samples.popleft()

    def _sync(self, t: int, scaler: Autoscaler) -> None:
        c = self.config
        active = self.active()
        current = len(active)
        horizon = t - c.steps(scaler.window_s)
        values: list[float] = []
        missing = 0
        for r in active:
            window = [v for (ts, v) in r.samples if ts > horizon]
            if not window:
                missing += 1
            elif AGGREGATION[scaler.metric] == "max":
                values.append(max(window))
            else:
                values.append(sum(window) / len(window))
        recommendation = current
        if values:
            ratio = sum(values) / (scaler.target * len(values))
            if missing:  # the HPA's rule: missing pods count as idle when scaling up, at target when scaling down
                fill = 0.0 if ratio > 1 else scaler.target
                ratio = (sum(values) + fill * missing) / (scaler.target * (len(values) + missing))
            if abs(ratio - 1.0) > scaler.tolerance:
                recommendation = math.ceil(ratio * (len(values) + missing) - 1e-9)
        desired = self._stabilize(t, current, recommendation, scaler)
        self.timeline.append(
            {
                "t_s": t * c.step_s,
                "replicas": current,
                "ready": sum(1 for r in active if r.ready(t)),
                "metric": sum(values),
                "recommendation": recommendation,
                "desired": desired,
                "waiting": sum(len(r.server.waiting) for r in self.replicas) + len(self.held),
            }
        )
        if desired > current:
            for _ in range(desired - current):
                self._add(t)
            self.changes.append((t, desired - current))
            self.scale_ups += 1
        elif desired < current:
            self._remove(t, current - desired)
            self.changes.append((t, desired - current))
            self.scale_downs += 1

    def _at_period_start(self, t: int, current: int, period_s: float) -> int:
        since = t - self.config.steps(period_s)
        return current - sum(n for ts, n in self.changes if ts > since)

    def _stabilize(self, t: int, current: int, recommendation: int, scaler: Autoscaler) -> int:
        c, b = self.config, scaler.behavior
        if not self.recommendations:  # as the HPA controller: a new autoscaler's history starts at the current size
            self.recommendations.append((t, current))
        keep = t - c.steps(max(b.up_window_s, b.down_window_s))
        while self.recommendations and self.recommendations[0][0] <= keep:
            self.recommendations.popleft()
        # The HPA's stabilisation: the current recommendation and those of each window (an empty one for 0 s).
        up = down = recommendation
        up_from = t - c.steps(b.up_window_s) if b.up_window_s else t
        down_from = t - c.steps(b.down_window_s) if b.down_window_s else t
        for ts, r in self.recommendations:
            if ts > up_from:
                up = min(up, r)
            if ts > down_from:
                down = max(down, r)
        self.recommendations.append((t, recommendation))
        desired = min(max(current, up), down)  # raise to the up window's floor, cap at the down window's ceiling
        # Rate limits from the size at the start of the period: the controller takes back this period's scale-ups
        # and scale-downs alike.
        if desired > current:
            desired = min(desired, b.up_limit(self._at_period_start(t, current, b.up_period_s)))
        elif desired < current:
            desired = max(desired, b.down_limit(self._at_period_start(t, current, b.down_period_s)))
        return max(scaler.min_replicas, min(scaler.max_replicas, desired))

    # --- the run ----------------------------------------------------------------------------------------------

    def run(self, workload: Sequence[WorkloadRequest]) -> FleetResult:
        c, scaler = self.config, self.config.autoscaler
        jobs = make_jobs(workload, c.memory)
        pending = list(reversed(jobs))
        scrape = c.steps(scaler.scrape_s) if scaler else 0
        sync = c.steps(scaler.sync_s) if scaler else 0
        grace = c.steps(c.grace_s)
        t = 0
        while pending or self.held or any(r.server.busy for r in self.replicas):
            while pending and pending[-1].arrival <= t:
                self.held.append(pending.pop())
            for r in list(self.replicas):
                if r.draining_since is None:
                    continue
                if not r.server.busy and r.busy_until <= t:
                    self._retire(r, t)
                elif t >= r.draining_since + grace:
                    self._abort_drained(r, t)
            if scaler is not None:
                if t % scrape == 0:
                    self._scrape(t, scaler)
                if t % sync == 0:
                    self._sync(t, scaler)
            self._dispatch(t)
            for r in self.replicas:
                if r.busy_until <= t and r.server.busy:
                    duration, _ = r.server.step(t)
                    r.busy_until = t + duration
            t = self._next_event(t, pending, scrape, sync, grace)
            if t > c.max_steps:
                raise SimulationError(f"the fleet did not finish within {c.max_steps} steps")
        end = t
        for r in self.replicas:
            r.gone_at = end
        return self._result(jobs, end)

    def _next_event(self, t: int, pending: list[SimJob], scrape: int, sync: int, grace: int) -> int:
        """The next step at which anything can happen (at least t + 1)."""
        candidates = [r.busy_until for r in self.replicas if r.server.busy]
        if pending:
            candidates.append(pending[-1].arrival)
        if self.held:
            candidates += [r.ready_at for r in self.replicas if r.draining_since is None]
        candidates += [r.draining_since + grace for r in self.replicas if r.draining_since is not None]
        if scrape:
            candidates += [(t // scrape + 1) * scrape, (t // sync + 1) * sync]
        later = [x for x in candidates if x > t]
        return min(later) if later else t + 1

    def _result(self, jobs: list[SimJob], end: int) -> FleetResult:
        s = self.config.step_s
        latencies = [(j.finished_at - j.arrival) * s for j in jobs if j.finished_at is not None]
        queue = [(j.first_admitted - j.arrival) * s for j in jobs if j.first_admitted is not None]
        c = self.config
        on_time = sum(
            1
            for j in jobs
            if j.finished_at is not None
            and j.first_admitted is not None
            and (j.first_admitted - j.arrival) * s <= c.slo_ttft_s
            and (j.finished_at - j.arrival) * s <= c.slo_ttft_s + c.slo_tpot_s * j.true_len
        )
        everyone = self.removed + self.replicas
        replica_steps = sum((r.gone_at if r.gone_at is not None else end) - r.created for r in everyone)
        counts = [0]
        for _, n in self.changes:
            counts.append(counts[-1] + n)
        return FleetResult(
            requests=len(jobs),
            step_s=s,
            mean_latency_s=sum(latencies) / len(latencies),
            p50_latency_s=percentile(latencies, 0.5),
            p99_latency_s=percentile(latencies, 0.99),
            mean_queue_s=sum(queue) / len(queue),
            p99_queue_s=percentile(queue, 0.99),
            on_time=on_time / len(jobs),
            replica_seconds=replica_steps * s,
            mean_replicas=replica_steps / end if end else float(self.config.replicas),
            peak_replicas=self.config.replicas + max(counts),
            scale_ups=self.scale_ups,
            scale_downs=self.scale_downs,
            evictions=sum(r.server.evictions for r in everyone),
            retried=self.retried,
            duration_s=end * s,
            timeline=self.timeline,
            latencies_s=latencies,
        )


def simulate_fleet(workload: Sequence[WorkloadRequest], config: FleetConfig) -> FleetResult:
    return Fleet(config).run(workload)


@dataclass(frozen=True)
class Phase:
    """A stretch of traffic: Poisson arrivals at `rate` requests per second, lognormal lengths (sigma 1, the
    scheduling benchmark's shapes) around the given medians."""

    seconds: float
    rate: float
    output_median: float = 120.0
    prompt_median: float = 40.0


def phased_workload(
    phases: Sequence[Phase], seed: int, step_s: float, intervals: str = "naive", max_output: int = 1000
) -> list[WorkloadRequest]:
    """Arrivals in steps of `step_s` seconds; `intervals` as `paper_workload`'s ("naive" or "noise:X")."""
    rng = np.random.default_rng(seed)
    out: list[WorkloadRequest] = []
    start = 0.0
    for phase in phases:
        n = int(rng.poisson(phase.rate * phase.seconds))
        times = np.sort(rng.uniform(start, start + phase.seconds, n))
        outputs = lognormal_lengths(rng, n, phase.output_median, 1.0, 1, max_output)
        prompts = lognormal_lengths(rng, n, phase.prompt_median, 1.0, 1, 1024)
        for when, o, p in zip(times.tolist(), outputs.tolist(), prompts.tolist(), strict=True):
            lo, hi = interval(intervals, o, max_output)
            out.append(WorkloadRequest(f"r{len(out)}", int(when / step_s), p, o, lo, hi))
        start += phase.seconds
    return out
