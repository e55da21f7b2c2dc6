"""The Prefect events the project emits, and their resources: what deployment triggers match on.

``fairdiffusion.data.published`` (sent by ``fairdiffusion data publish``) starts the
``weekly-retraining`` deployment through its trigger in ``prefect.yaml``;
``fairdiffusion.model.awaiting-approval`` (emitted by the flow) tells whoever listens
(an automation, a notification) that a version passed the gate and waits for
``fairdiffusion approve``, and ``fairdiffusion.model.approved`` (sent by that command) that
a person promoted it. The library never imports Prefect: the CLI imports this module
inside its command, as it imports the flow.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass

from prefect.events import Event, emit_event
from prefect.events.clients import get_events_client
from prefect.settings import PREFECT_API_URL

from fairdiffusion.data.versioning import DataPublication
from fairdiffusion.registry import schema
from fairdiffusion.registry.lineage import PromotionOutcome
from fairdiffusion.registry.promotion import DecisionRecord

DATA_PUBLISHED = "fairdiffusion.data.published"
MODEL_AWAITING_APPROVAL = "fairdiffusion.model.awaiting-approval"
MODEL_APPROVED = "fairdiffusion.model.approved"

#: Resource ids: ``fairdiffusion.data.<dataset folder relative to the repository root>``
#: (the trigger in prefect.yaml matches ``fairdiffusion.data.data``) and
#: ``fairdiffusion.model.<registered model>.<version>``.
DATA_RESOURCE_PREFIX = "fairdiffusion.data."
MODEL_RESOURCE_PREFIX = "fairdiffusion.model."
#: Resource labels (all strings); the trigger passes ``DATA_MD5`` to the run as ``data_md5``.
DATA_MD5 = "fairdiffusion.data.md5"
DATA_PREVIOUS_MD5 = "fairdiffusion.data.previous-md5"
DATA_DVC_FILE = "fairdiffusion.data.dvc-file"
DATA_PUSHED = "fairdiffusion.data.pushed"
COMMIT = "fairdiffusion.commit"
MODEL_NAME = "fairdiffusion.model.name"
MODEL_VERSION = "fairdiffusion.model.version"
MLFLOW_RUN_ID = "fairdiffusion.mlflow.run-id"
APPROVER = "fairdiffusion.approver"


@dataclass(frozen=True)
class EventDelivery:
    """Whether an event reached the Prefect server, and if not, why."""

    event: str
    sent: bool
    api_url: str | None
    event_id: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form."""
        return asdict(self)


def data_published_resource(publication: DataPublication) -> dict[str, str]:
    """The resource of a ``fairdiffusion.data.published`` event."""
    return {
        "prefect.resource.id": DATA_RESOURCE_PREFIX + publication.dataset,
        "prefect.resource.name": publication.dataset,
        DATA_MD5: publication.dvc_md5,
        DATA_PREVIOUS_MD5: publication.previous_md5 or "",
        DATA_DVC_FILE: publication.dvc_file,
        DATA_PUSHED: str(publication.pushed).lower(),
        COMMIT: publication.commit or "",
    }


def send_data_published(publication: DataPublication) -> EventDelivery:
    """Send ``fairdiffusion.data.published`` to the server PREFECT_API_URL names (see :func:`_send`)."""
    return _send(
        Event(event=DATA_PUBLISHED, resource=data_published_resource(publication), payload=publication.to_dict())
    )


def model_resource(model_name: str, version: str) -> dict[str, str]:
    """The resource of the ``fairdiffusion.model.*`` events: one registered model version."""
    return {
        "prefect.resource.id": f"{MODEL_RESOURCE_PREFIX}{model_name}.{version}",
        "prefect.resource.name": f"{model_name} v{version}",
        MODEL_NAME: model_name,
        MODEL_VERSION: version,
    }


def send_model_approved(record: DecisionRecord) -> EventDelivery:
    """Send ``fairdiffusion.model.approved`` for the approval ``record`` (see :func:`_send`)."""
    resource = model_resource(record.model, record.version) | {APPROVER: record.actor}
    return _send(Event(event=MODEL_APPROVED, resource=resource, payload=record.to_dict()))


def _send(event: Event) -> EventDelivery:
    """Send ``event`` to the server PREFECT_API_URL names, and wait until it has it.

    Sent directly, not through ``emit_event``'s background worker: the CLI must know
    that the event arrived before it says so, and with no API URL ``emit_event`` would
    start a throwaway local server that no deployment listens to.
    """
    api_url = PREFECT_API_URL.value()
    if not api_url:
        return EventDelivery(event.event, sent=False, api_url=None, reason="PREFECT_API_URL is not set")

    async def send() -> None:
        # The client waits for the server's answer to a ping after each event (its checkpoint).
        async with get_events_client(reconnection_attempts=2) as client:
            await client.emit(event)

    try:
        asyncio.run(send())
    except Exception as error:  # noqa: BLE001 - websockets, OS and HTTP errors: the message is what matters
        return EventDelivery(event.event, sent=False, api_url=api_url, reason=f"{type(error).__name__}: {error}")
    return EventDelivery(event.event, sent=True, api_url=api_url, event_id=str(event.id))


def emit_awaiting_approval(outcome: PromotionOutcome) -> None:
    """Emit ``fairdiffusion.model.awaiting-approval`` for an outcome that waits for a person; else nothing.

    Called in the flow, so Prefect relates the event to the flow run and its deployment.
    """
    if outcome.status != schema.STATUS_AWAITING_APPROVAL:
        return
    emit_event(
        event=MODEL_AWAITING_APPROVAL,
        resource=model_resource(outcome.model_name, outcome.version) | {MLFLOW_RUN_ID: outcome.run_id},
        payload={
            "reasons": outcome.reasons,
            "compared_with_version": outcome.compared_with_version,
            "approve": f"fairdiffusion approve --model {outcome.model_name} --version {outcome.version} --reason TEXT",
        },
    )
