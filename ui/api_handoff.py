"""The hand-off over HTTP, for chat clients other than the web page (`chatbot.handoff`).

| route | auth | does |
|---|---|---|
| ``POST /api/handoff/contact`` | the conversation's token | ``{"conversation_id", "conversation_token", "contact"}``: an e-mail or phone for the team's reply (validated: HTTP 400 with the fix otherwise) |
| ``POST /api/handoff/replies`` | the conversation's token | ``{"conversation_id", "conversation_token", "after"?}`` → the team's replies with an id above ``after`` (poll it while a ticket is open) |

Both take the token in the body (never in a URL, where logs would keep it); another client's
conversation gets the same 404 as an unknown one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

__all__ = ["add_handoff_routes"]


class ContactRequest(BaseModel):
    conversation_id: str
    conversation_token: str
    contact: str = Field(max_length=320, description="an e-mail address or a phone number")


class ContactResponse(BaseModel):
    ticket_id: int
    contact_kind: str


class RepliesRequest(BaseModel):
    conversation_id: str
    conversation_token: str
    after: int = Field(0, description="the last reply id already shown")


class ReplyItem(BaseModel):
    id: int
    text: str
    created_at: str


class RepliesResponse(BaseModel):
    ticket_id: int | None
    status: str | None
    replies: list[ReplyItem]


def add_handoff_routes(router: APIRouter, engine: Any, call: Callable[..., Awaitable[Any]]) -> None:
    """Add the routes to the public ``/api`` router; ``call`` runs engine work off the event loop."""

    @router.post("/handoff/contact", response_model=ContactResponse)
    async def handoff_contact(body: ContactRequest) -> ContactResponse:
        await call(engine.check_owner, body.conversation_id, body.conversation_token)
        ticket = await call(engine.handoff.add_contact, body.conversation_id, body.contact)
        return ContactResponse(ticket_id=ticket.id, contact_kind=ticket.contact_kind or "")

    @router.post("/handoff/replies", response_model=RepliesResponse)
    async def handoff_replies(body: RepliesRequest) -> RepliesResponse:
        await call(engine.check_owner, body.conversation_id, body.conversation_token)
        ticket = await call(engine.handoff.tickets.for_conversation, body.conversation_id)
        replies = await call(engine.handoff.replies, body.conversation_id, after=body.after)
        return RepliesResponse(
            ticket_id=ticket.id if ticket else None,
            status=ticket.status if ticket else None,
            replies=[ReplyItem(id=r.id, text=r.text, created_at=r.created_at) for r in replies],
        )
