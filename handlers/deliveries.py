"""The outbox for operators: GET /v1/deliveries (newest first) and POST /v1/deliveries/retry."""

from __future__ import annotations

import logging
from typing import Any, cast

from daemon.clock import rfc3339
from handlers.base import ApiError, BaseHandler
from handlers.notifications import PAGE_DEFAULT, PAGE_MAX, delivery_json
from handlers.rooms import check_calendar_id
from storage.base import (
    DELIVERY_STATES,
    RETRYABLE_STATES,
    Delivery,
    DeliveryState,
    RetryableState,
    RetryOutcome,
)

log = logging.getLogger(__name__)

ID_MAX = 2**62
RETRY_IDS_MAX = PAGE_MAX  # ids one retry may name
SKIPPED_SHOWN = 500  # skipped deliveries listed in a retry's answer (all are counted)
RETRY_FIELDS = frozenset({"ids"})


def delivery_record_json(delivery: Delivery) -> dict[str, Any]:
    """One delivery as GET /v1/deliveries shows it: a notification's summary of it (the FCM
    token by its last 8 characters) with its ids and times."""
    return {
        "id": delivery.id,
        "notification_id": delivery.notification_id,
        "calendar_id": delivery.calendar_id,
        **delivery_json(delivery),
        "created_at": rfc3339(delivery.created_at),
        "updated_at": rfc3339(delivery.updated_at),
    }


def retry_json(outcome: RetryOutcome) -> dict[str, Any]:
    return {
        "retried": len(outcome.retried),
        "skipped": [
            {"id": s.id, "reason": s.reason, "state": s.state}
            for s in outcome.skipped[:SKIPPED_SHOWN]
        ],
        "skipped_total": len(outcome.skipped),
    }


def check_ids(ids: Any) -> list[int]:
    if not isinstance(ids, list) or not 1 <= len(ids) <= RETRY_IDS_MAX:
        raise ApiError(400, "invalid_ids", f"ids must be a list of 1 to {RETRY_IDS_MAX} ids")
    for value in ids:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= ID_MAX:
            raise ApiError(400, "invalid_ids", f"ids must be integers from 1 to {ID_MAX}")
    return list(dict.fromkeys(ids))


class DeliveriesBase(BaseHandler):
    def state_arg(self, allowed: tuple[str, ...]) -> str | None:
        state = self.str_arg("state")
        if state is None:
            return None
        if state not in allowed:
            raise ApiError(400, "invalid_state", f"state must be one of {', '.join(allowed)}")
        return state


class DeliveryListHandler(DeliveriesBase):
    """GET /v1/deliveries?state=&calendar_id=&limit=&before="""

    auth = "api_key"

    async def get(self) -> None:
        state = cast("DeliveryState | None", self.state_arg(DELIVERY_STATES))
        calendar_id = self.str_arg("calendar_id")
        if calendar_id is not None:
            check_calendar_id(calendar_id)
        limit = self.int_arg("limit", PAGE_DEFAULT, 1, PAGE_MAX) or PAGE_DEFAULT
        before = self.int_arg("before", None, 1, ID_MAX)
        store = self.service.store
        page = await store.outbox.list(state, calendar_id, before, limit)
        by_state = dict.fromkeys(DELIVERY_STATES, 0)
        for (counted, _kind), n in (await store.outbox.counts(calendar_id)).items():
            by_state[counted] = by_state.get(counted, 0) + n
        self.write_json(
            {
                "deliveries": [delivery_record_json(d) for d in page],
                # Newest first: a full page may have older ones behind it, from before its last.
                "next_before": page[-1].id if len(page) == limit else None,
                "counts": by_state,
            }
        )


class DeliveryRetryHandler(DeliveriesBase):
    """POST /v1/deliveries/retry with {"ids": [..]}, or ?state=failed (or expired)"""

    auth = "api_key"

    async def post(self) -> None:
        body = self.json_body(required=False)
        unknown = set(body) - RETRY_FIELDS
        if unknown:
            raise ApiError(400, "unknown_field", f"unknown field(s): {', '.join(sorted(unknown))}")
        state = cast("RetryableState | None", self.state_arg(RETRYABLE_STATES))
        if (state is None) == ("ids" not in body):
            raise ApiError(
                400, "invalid_body", 'give {"ids": [..]} in the body or ?state=, one of the two'
            )
        ids = check_ids(body["ids"]) if state is None else None
        service = self.service
        outcome = await service.store.outbox.retry(service.clock.now(), ids=ids, state=state)
        if outcome.retried:
            service.delivery.wake()  # they are due now
        log.info(
            "deliveries_retried",
            extra={
                "retried": len(outcome.retried),
                "skipped": len(outcome.skipped),
                "by": f"state={state}" if state else "ids",
            },
        )
        self.write_json(retry_json(outcome))


routes = [
    (r"/v1/deliveries", DeliveryListHandler),
    (r"/v1/deliveries/retry", DeliveryRetryHandler),
]
