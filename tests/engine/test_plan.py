"""The iteration's three hand-offs, each alone: the scheduler's plan, the runner's result, the statistics
computed from the two; plus the module boundaries the architecture promises (docs/architecture.md)."""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from autoscaler.probes import MemoryReading, SimulatedProbe
from configs.controller import ControllerConfig
from engine.capacity import Preemption
from engine.memory_controller import MemoryController
from engine.plan import BatchRow, BatchShape, IterationPlan, Join, Prefill, SampleSpec, StepResult
from engine.request import SamplingParams
from engine.stats import iteration_stats
from tests.helpers import make_engine, run_to_completion, solo_greedy

ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


def test_baton_pd_plans_prefill_first_then_joins_from_the_pool(tiny_model) -> None:
    engine = make_engine(tiny_model, policy="baton-pd", max_batch_size=4, prefill_token_budget=64)
    engine.add_request("a", prompt_token_ids=[11, 12, 13], sampling_params=GREEDY)
    engine.add_request("b", prompt_token_ids=[21, 22], sampling_params=GREEDY)

    first = engine.scheduler.schedule()
    assert "Prefill(request_id='a'" in repr(first)  # plain data: printable
    assert [p.request_id for p in first.prefill] == ["a", "b"] and not any(p.join for p in first.prefill)
    assert first.prefill[0].token_ids == (11, 12, 13) and first.prefill[0].sample.index == 0
    assert first.join == () and first.batch == () and first.retire == () and first.preempt == ()

    result = engine.runner.execute(first, engine.cache)
    assert set(result.prefill_tokens) == set(result.pooled) == {"a", "b"}
    assert result.batch is None and engine.cache.rows == 0  # pooled KV waits outside the batch
    assert result.prefill_computed == 5 and result.pooled["a"].length == 3
    outs = engine.scheduler.update(first, result)
    assert {o.request_id: o.new_token_ids for o in outs} == {r: [t] for r, t in result.prefill_tokens.items()}

    second = engine.scheduler.schedule()
    assert [j.request_id for j in second.join] == ["a", "b"] and all(j.kv is not None for j in second.join)
    assert [(r.request_id, r.feed, r.sample.index if r.sample else None) for r in second.batch] == [
        ("a", (result.prefill_tokens["a"],), 1), ("b", (result.prefill_tokens["b"],), 1)]


def test_runner_executes_a_hand_built_baton_join(tiny_model) -> None:
    """A plan written by hand: prefill a prompt, embed it at once, and decode it in the same iteration."""
    engine = make_engine(tiny_model, policy="baton", max_batch_size=2)
    prompt = [31, 32, 33, 34]
    spec = SampleSpec(GREEDY, seed=0, index=0)
    plan = IterationPlan(
        iteration=0, capacity=2, prefill=(Prefill("x", tuple(prompt), spec, join=True),),
        batch=(BatchRow("x", None, SampleSpec(GREEDY, seed=0, index=1)),),
    )
    result = engine.runner.execute(plan, engine.cache)
    assert engine.cache.ids == ["x"] and engine.cache.real == [len(prompt) + 1]
    assert result.batch == BatchShape(rows=1, width=1, attended_columns=5, padded_columns=0)
    assert [result.prefill_tokens["x"], result.batch_tokens["x"]] == solo_greedy(tiny_model.model, prompt, 2)
    engine.cache.check_invariants()


def test_runner_rejects_a_plan_whose_batch_is_not_the_cache(tiny_model) -> None:
    engine = make_engine(tiny_model, policy="baton", max_batch_size=2)
    plan = IterationPlan(iteration=0, capacity=2, batch=(BatchRow("ghost", (5,), None),))
    with pytest.raises(AssertionError, match="batch rows must be the cache's rows"):
        engine.runner.execute(plan, engine.cache)


def test_iteration_stats_come_from_plan_and_result_alone() -> None:
    """Three rows: an in-batch prompt of 4 tokens, a decode row, a finished row computed idle; plus a
    separate 5-token prefill. Width 4: 12 batch slots, 5 of them useful."""
    spec = SampleSpec(GREEDY, seed=1, index=0)
    plan = IterationPlan(
        iteration=7, capacity=3, join=(Join("p", None),),
        prefill=(Prefill("q", (1, 2, 3, 4, 5), spec, join=False),),
        batch=(BatchRow("p", (1, 2, 3, 4), spec), BatchRow("d", (9,), spec), BatchRow("f", (9,), None)),
        preempt=(Preemption("s", "swap"), Preemption("r", "recompute"), Preemption("t", "swap")),
        memory=MemoryReading(used_bytes=600, total_bytes=1000, engine_bytes=400, source="test"),
        controller_s=0.25,
    )
    result = StepResult(batch=BatchShape(rows=3, width=4, attended_columns=30, padded_columns=10),
                        prefill_computed=5, forward_s=0.5, cache_columns=10)
    it = iteration_stats(plan, result, accounted_bytes=300, total_s=1.0)
    assert (it.iteration, it.rows, it.capacity) == (7, 3, 3)
    assert (it.useful_slots, it.idle_slots) == (5 + 4 + 1, 12 - 4 - 1)
    assert (it.prefill_tokens, it.decode_tokens) == (9, 1)
    assert (it.attended_columns, it.padded_columns, it.cache_columns) == (30, 10, 10)
    assert it.memory_fraction == pytest.approx((600 - 400 + 300) / 1000)  # the rest of the device + our peak
    assert it.preemptions == {"swap": 2, "recompute": 1}
    assert (it.forward_s, it.controller_s, it.total_s) == (0.5, 0.25, 1.0)


@dataclass
class CountingProbe:
    """A simulated probe that counts its reads."""

    inner: SimulatedProbe
    reads: list[int] = field(default_factory=list)
    name: str = "counting"
    sees_whole_cache: bool = False

    def read(self, engine_bytes: int, iteration: int) -> MemoryReading:
        self.reads.append(iteration)
        return self.inner.read(engine_bytes, iteration)


def test_the_probe_is_read_once_per_iteration(tiny_model) -> None:
    config = ControllerConfig(probe="simulated", memory_budget_bytes=1 << 40)
    probe = CountingProbe(SimulatedProbe(1 << 40))
    from configs import EngineConfig
    from engine import BatonEngine

    engine = BatonEngine(EngineConfig(max_batch_size=4), loaded=tiny_model, controller=MemoryController(config),
                         probe=probe)
    for i in range(5):
        engine.add_request(f"r{i}", prompt_token_ids=[40 + i, 50 + i], sampling_params=GREEDY)
    while engine.has_unfinished_requests():
        engine.step()
    assert probe.reads == list(range(engine.iteration)) and engine.iteration > 5


@pytest.mark.parametrize("sees_whole_cache", [True, False])
def test_a_reading_that_sees_the_whole_cache_loses_its_unused_headroom(tiny_model, sees_whole_cache) -> None:
    """A device reading counts the whole preallocated cache buffer; its unused part is the engine's own
    reserve, not pressure, so it is taken out. A probe that counts only the engine's bytes is left alone."""
    from configs import EngineConfig
    from engine import BatonEngine

    probe = BufferProbe(sees_whole_cache)
    engine = BatonEngine(EngineConfig(max_batch_size=2), loaded=tiny_model,
                         controller=MemoryController(ControllerConfig(probe="simulated", memory_budget_bytes=1 << 40)),
                         probe=probe)
    probe.buffer_bytes = engine.cache.reserved_bytes
    engine.add_request("a", prompt_token_ids=[5, 6, 7], sampling_params=GREEDY)
    for _ in range(3):
        engine.step()
    plan = engine.scheduler.schedule()
    held = engine.cache.used_bytes()  # no retirements, no pool: what the engine holds
    buffer = engine.cache.reserved_bytes()
    assert plan.memory is not None and plan.memory.engine_bytes == held > 0
    assert plan.memory.used_bytes == (held + OTHERS if sees_whole_cache else buffer + OTHERS)


OTHERS = 12_345  # bytes another tenant holds


@dataclass
class BufferProbe:
    """Reads the whole cache buffer as used (as NVML or host RSS would), plus another tenant's bytes."""

    sees_whole_cache: bool
    name: str = "buffer"
    buffer_bytes: Callable[[], int] = lambda: 0

    def read(self, engine_bytes: int, iteration: int) -> MemoryReading:
        return MemoryReading(used_bytes=self.buffer_bytes() + OTHERS, total_bytes=1 << 40, engine_bytes=engine_bytes,
                             source=self.name)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_engine_reaches_autoscaler_only_through_the_probe_interface() -> None:
    for path in sorted((ROOT / "engine").glob("*.py")):
        bad = {m for m in _imports(path) if m.split(".")[0] == "autoscaler"
               and m not in ("autoscaler.probes", "autoscaler.probes.base", "autoscaler.probes.registry")}
        assert not bad, f"{path.name} imports {bad}"
    for path in sorted((ROOT / "autoscaler").rglob("*.py")):
        assert not {m for m in _imports(path) if m.split(".")[0] in ("engine", "deployments")}, path


def test_nan_logits_fail_only_their_own_request(tiny_model, monkeypatch) -> None:
    """A row whose logits turn NaN (a model or device fault) ends with an error; its neighbours go on,
    token-identical to their solo runs, and its row leaves the batch."""
    from engine.model_runner import ModelRunner

    real_forward = ModelRunner.batch_forward

    def poisoned(self, cache, *inputs):
        logits = real_forward(self, cache, *inputs)
        if "b" in cache.ids:
            logits[cache.ids.index("b")] = float("nan")
        return logits

    monkeypatch.setattr(ModelRunner, "batch_forward", poisoned)
    engine = make_engine(tiny_model, policy="baton-pd", max_batch_size=4)
    prompts = {"a": [61, 62, 63], "b": [71, 72], "c": [81, 82, 83, 84]}
    for rid, ids in prompts.items():
        engine.add_request(rid, prompt_token_ids=ids, sampling_params=GREEDY)
    outs = run_to_completion(engine)
    assert outs["b"][-1].finish_reason == "error" and "NaN" in (outs["b"][-1].error or "")
    for rid in ("a", "c"):
        assert outs[rid][-1].finish_reason == "length"
        tokens = [t for o in outs[rid] for t in o.new_token_ids]
        assert tokens == solo_greedy(tiny_model.model, prompts[rid], GREEDY.max_tokens)
    assert engine.cache.rows == 0 and not engine.has_unfinished_requests()
