"""The state a pipeline run ends in, named after its outcome so that the Prefect UI says what happened.

``Rejected`` is a Failed-type state (the run did not deliver a champion; calling the
flow raises :class:`~fairdiffusion.errors.GateRejected`, which carries the outcome);
``Skipped`` and ``AwaitingApproval`` are Completed-type states whose result is the outcome.
"""

from __future__ import annotations

from prefect.states import Completed, Failed, State

from fairdiffusion.errors import GateRejected
from fairdiffusion.registry import schema
from fairdiffusion.registry.gate_summary import outcome_line
from fairdiffusion.registry.lineage import PromotionOutcome

REJECTED = "Rejected"
SKIPPED = "Skipped"
AWAITING_APPROVAL = "AwaitingApproval"

#: Completed-type state names by outcome status (a promotion ends plain ``Completed``).
COMPLETED_NAMES = {schema.STATUS_SKIPPED: SKIPPED, schema.STATUS_AWAITING_APPROVAL: AWAITING_APPROVAL}


def final_state(outcome: PromotionOutcome) -> State[PromotionOutcome]:
    """The named state for an outcome; its message is the outcome's one-line summary."""
    message = outcome_line(outcome)
    if outcome.status == schema.STATUS_REJECTED:
        rejected: State[PromotionOutcome] = Failed(name=REJECTED, message=message, data=GateRejected(message, outcome))
        return rejected
    return Completed(name=COMPLETED_NAMES.get(outcome.status, "Completed"), message=message, data=outcome)
