"""The controller's state machine and its queries, on the controller's own state (no processes): transitions
happen only through explicit calls, and the questions the re-planning loop asks change nothing."""

from __future__ import annotations

import pytest

from homering.controller.admission import Admission
from homering.controller.planning import IllegalTransition, Planning
from homering.transport.mqtt import BrokerURL
from homering.wire import AgentProfile, AgentStatus, ControllerState, DeviceProfile, Plan, PlanAgent


def test_the_state_machine_has_its_transitions_in_one_place():
    """The controller's state changes only through the transitions of its state machine: serving opens the
    admission gate for a new ready generation, an interruption closes it, a failed re-plan waits for the
    members to change, and a transition the machine does not have is refused."""
    admission = Admission(n_parallel=1, max_queue=0)
    planning = Planning(admission)
    assert planning.state == ControllerState.WAITING and not planning.ready
    planning.begin("probing")
    assert (planning.state, planning.detail, admission.open) == (ControllerState.PLANNING, "probing", False)
    planning.serve()
    assert planning.ready and admission.open and admission.generation == 1
    planning.ring_broken("another plan", "stalled")  # not the plan in force: nothing to re-plan
    assert planning.broken is None
    with pytest.raises(IllegalTransition):
        planning.no_agents()  # from READY the machine goes through PLANNING first
    planning.interrupt()
    assert not planning.ready and not admission.open
    planning.replan_failed("does not fit", frozenset())
    assert planning.state == ControllerState.WAITING and planning.failed[1] == "does not fit"
    assert planning.detail == "re-planning failed: does not fit"
    planning.begin()
    planning.serve()
    assert planning.failed is None and admission.generation == 2
    assert planning.leave() and planning.state == ControllerState.OFFLINE and not planning.leave()


def test_asking_whether_to_replan_changes_nothing(smollm2):
    """The re-planning loop's question (was an agent of the ring lost? did agents join?) is a pure query:
    the plan in force keeps serving until the loop calls a transition (the old predicate stopped it)."""
    from homering.controller.controller import Controller
    from homering.controller.replanning import Change

    c = Controller(BrokerURL("127.0.0.1", 1), smollm2, n_agents=1)
    m = c.membership
    m.fingerprint = "fp"
    m.connected()
    for pid, name in enumerate(("a", "b"), 1):
        m.on_profile(
            AgentProfile.model_construct(
                name=name,
                host="127.0.0.1",
                data_port=1000 + pid,
                pid=pid,
                device=DeviceProfile.model_construct(model_fingerprint="fp"),
            )
        )
        m.on_status(name, AgentStatus(state="ready", plan_id="p1"), retained=False)
    plan = Plan.model_construct(plan_id="p1", ring=[PlanAgent.model_construct(name=n) for n in ("a", "b")])
    c.planning.adopt(plan, m.members(None), {})
    assert c.ready and c.state == ControllerState.READY and c.plan is plan and c.replanner.change() is None
    m.on_status("a", AgentStatus(state="offline"), retained=True)  # a of the ring is gone
    generation = c.admission.generation
    for _ in range(3):
        assert c.replanner.change() is Change.LOST
    assert c.ready and c.admission.open and c.admission.generation == generation  # only a transition stops it
    c.planning.interrupt()
    assert not c.ready and c.state == ControllerState.PLANNING and not c.admission.open
