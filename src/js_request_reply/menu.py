"""The seed's menu: what the example responder serves."""

from __future__ import annotations

from nats.aio.msg import Msg

MENU = {
    "requests.order-sandwich": "🥪",
    "requests.order-bagel": "🥯",
    "requests.order-flatbread": "🥙",
}


def menu_handlers() -> dict:
    """Handlers for the seed's menu: each item's subject answers with its emoji; anything else is rejected."""

    def serve(item: str):
        def handler(msg: Msg) -> str:
            return item

        return handler

    return {subject: serve(item) for subject, item in MENU.items()}
