"""Scheduler decisions with a fake clock and a fake runner whose exit layers are scripted per request."""

from __future__ import annotations

import subprocess
import sys

import pytest

from server.engine.errors import QueueFullError
from tests.server.engine.fakes import FakeRunner, add_request, make_scheduler, step


def test_scheduler_imports_no_torch_fastapi_or_prometheus() -> None:
    code = (
        "import sys\n"
        "for name in ('torch', 'fastapi', 'prometheus_client', 'transformers'):\n"
        "    sys.modules[name] = None  # any import of it now raises ImportError\n"
        "import server.engine.scheduler\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_rows_exit_at_scripted_layers_and_finish_at_once() -> None:
    scheduler = make_scheduler()
    a, a_rows = add_request(scheduler, 2)
    b, b_rows = add_request(scheduler, 3)
    runner = FakeRunner({a: 1, b: 3})
    finished_per_step = [[row.row_id for row, _ in step(scheduler, runner)] for _ in range(3)]
    # a's rows reply after layer 1, before b's rows are done; b's rows after layer 3.
    assert finished_per_step == [a_rows, [], b_rows]
    assert [p.layer for p in runner.plans] == [1, 2, 3]
    assert not scheduler.has_work()


def test_max_batch_size_and_token_budget() -> None:
    scheduler = make_scheduler(max_batch_size=3, max_batch_tokens=40)
    add_request(scheduler, 5, num_tokens=10)
    plan = scheduler.schedule(0.0).plan
    assert plan is not None and len(plan.new_rows) == 3  # batch size cap
    scheduler = make_scheduler(max_batch_size=8, max_batch_tokens=40)
    add_request(scheduler, 5, num_tokens=10)
    plan = scheduler.schedule(0.0).plan
    assert plan is not None and len(plan.new_rows) == 4  # 4 rows x 10 tokens = 40 <= budget


def test_max_wait_holds_a_small_batch_for_company() -> None:
    scheduler = make_scheduler(max_wait_ms=5.0)
    add_request(scheduler, 1, now_s=0.0)
    decision = scheduler.schedule(0.001)
    assert decision.plan is None and decision.wake_at_s == pytest.approx(0.005)
    add_request(scheduler, 1, now_s=0.002)
    decision = scheduler.schedule(0.006)
    assert decision.plan is not None and len(decision.plan.new_rows) == 2
    # A full batch starts at once.
    scheduler = make_scheduler(max_wait_ms=5.0, max_batch_size=2)
    add_request(scheduler, 2, now_s=0.0)
    assert scheduler.schedule(0.0).plan is not None


def test_refill_new_rows_start_while_deeper_cohort_in_flight_and_merge() -> None:
    scheduler = make_scheduler(max_batch_size=16)
    a, a_rows = add_request(scheduler, 4)
    runner = FakeRunner({a: 6})
    step(scheduler, runner)  # a: layer 1 -> depth 1 (4 rows)
    b, b_rows = add_request(scheduler, 6)
    runner.exit_layer_by_request[b] = 6
    step(scheduler, runner)  # depth 0 has 6 rows > depth 1's 4: b starts at layer 1 while a waits
    assert runner.plans[-1].layer == 1
    assert [r.row_id for r in runner.plans[-1].new_rows] == b_rows
    assert scheduler.cohort_depths() == {1: 10}
    step(scheduler, runner)  # both cohorts at depth 1 merge into one step of layer 2
    merged = runner.plans[-1]
    assert merged.layer == 2 and merged.num_rows == 10
    assert len(merged.sources) == 2 and sorted(merged.row_ids) == sorted(a_rows + b_rows)
    assert scheduler.cohort_depths() == {2: 10}


def test_refill_keeps_steps_full_as_rows_exit() -> None:
    # a's rows all leave after layer 1 except one; b joins and fills the next steps.
    scheduler = make_scheduler(max_batch_size=4)
    a, _ = add_request(scheduler, 4)
    runner = FakeRunner({a: 1})
    b, _ = add_request(scheduler, 4)
    runner.exit_layer_by_request[b] = 2
    step(scheduler, runner)  # a at layer 1: all exit
    step(scheduler, runner)  # b starts right away
    assert [(p.layer, p.num_rows) for p in runner.plans] == [(1, 4), (1, 4)]


def test_shrink_mode_admits_only_when_nothing_in_flight() -> None:
    scheduler = make_scheduler(mode="shrink")
    a, _ = add_request(scheduler, 4)
    runner = FakeRunner({a: 2})
    step(scheduler, runner)
    b, _ = add_request(scheduler, 6)
    runner.exit_layer_by_request[b] = 1
    step(scheduler, runner)
    assert [(p.layer, p.num_rows) for p in runner.plans] == [(1, 4), (2, 4)]
    step(scheduler, runner)  # only now b starts
    assert (runner.plans[-1].layer, runner.plans[-1].num_rows) == (1, 6)


def test_no_cohort_starves() -> None:
    # A single deep row keeps losing to full new batches until it has been passed over max_skips times.
    scheduler = make_scheduler(max_batch_size=4, max_skips=2, max_inflight_rows=1000)
    a, _ = add_request(scheduler, 1)
    runner = FakeRunner({a: 6})
    step(scheduler, runner)
    for _ in range(6):
        request_id, _ = add_request(scheduler, 4)
        runner.exit_layer_by_request[request_id] = 1
    layers = []
    for _ in range(4):
        step(scheduler, runner)
        layers.append((runner.plans[-1].layer, runner.plans[-1].num_rows))
    assert (2, 1) in layers[:3], layers


def test_inflight_cap_limits_admission() -> None:
    scheduler = make_scheduler(max_batch_size=4, max_inflight_rows=6, max_skips=1)
    a, _ = add_request(scheduler, 4)
    b, _ = add_request(scheduler, 4)
    runner = FakeRunner({a: 6, b: 6})
    for _ in range(5):
        step(scheduler, runner)
        assert scheduler.num_inflight_rows <= 6
    # a's 4 rows are in flight; the 2 rows of room left do not trickle b in as a 2-row cohort while a
    # bigger one is in flight: b waits until its startable group is the biggest.
    assert scheduler.num_inflight_rows == 4
    assert scheduler.num_waiting == 4
    assert [p.layer for p in runner.plans] == [1, 2, 3, 4, 5]


def test_queue_full_refuses_whole_request() -> None:
    scheduler = make_scheduler(max_queue_size=5)
    add_request(scheduler, 4)
    with pytest.raises(QueueFullError) as e:
        add_request(scheduler, 2)
    assert e.value.retry_after_s > 0
    assert scheduler.num_waiting == 4


def test_deadline_drops_waiting_and_inflight_rows() -> None:
    scheduler = make_scheduler()
    a, a_rows = add_request(scheduler, 2, deadline_s=1.0)
    b, _ = add_request(scheduler, 2)
    runner = FakeRunner({a: 6, b: 6})
    step(scheduler, runner, now_s=0.5)
    decision = scheduler.schedule(1.5)
    assert sorted(r.row_id for r in decision.expired) == a_rows
    assert decision.plan is not None
    assert sorted(r for rows in decision.plan.dropped.values() for r in rows) == a_rows
    assert decision.plan.num_rows == 2 and sorted(decision.plan.row_ids) != a_rows
    scheduler.update_from_output(decision.plan, runner.execute(decision.plan))
    assert scheduler.cohort_depths() == {2: 2}
    # A waiting row past its deadline never reaches the runner.
    _, c_rows = add_request(scheduler, 1, now_s=2.0, deadline_s=2.1)
    decision = scheduler.schedule(3.0)
    assert [r.row_id for r in decision.expired] == c_rows
    assert decision.plan is not None and c_rows[0] not in decision.plan.row_ids


def test_cancel_drops_rows_before_compute() -> None:
    scheduler = make_scheduler()
    a, _ = add_request(scheduler, 3)
    b, _ = add_request(scheduler, 1)
    assert scheduler.cancel_request(a) == 3
    plan = scheduler.schedule(0.0).plan
    assert plan is not None and plan.num_rows == 1 and plan.new_rows[0].request_id == b


def test_fail_step_fails_only_that_steps_requests() -> None:
    scheduler = make_scheduler(max_batch_size=2)
    a, _ = add_request(scheduler, 2)
    b, _ = add_request(scheduler, 2)
    plan = scheduler.schedule(0.0).plan
    assert plan is not None
    assert scheduler.fail_step(plan) == ({a}, [])
    runner = FakeRunner({b: 1})
    finished = step(scheduler, runner)
    assert {row.request_id for row, _ in finished} == {b}


def test_deadline_heap_stays_bounded_by_live_rows() -> None:
    scheduler = make_scheduler(max_batch_size=8)
    runner = FakeRunner({})
    for _ in range(500):  # requests that finish long before their (far) deadline
        request_id, _ = add_request(scheduler, 1, deadline_s=3600.0)
        runner.exit_layer_by_request[request_id] = 1
        step(scheduler, runner)
    assert not scheduler.has_work()
    assert len(scheduler._deadlines) <= 65  # rebuilt from the (no) live rows, never 500
