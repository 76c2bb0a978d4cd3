"""The operator's commands: `relay subscriptions list|show|redeliver` and `relay stats`.

They work on the database directly, through the store (store.inspect and store.stats), like
`relay keys`, so they run beside a running `relay serve` and need no admin token. They see
every key's subscriptions. Callback URLs are shown without their query strings and error
texts are redacted as in the logs; `--json` prints one JSON document. An unknown id, or a
redelivery with nothing to send, is one line on stderr and exit code 2 (cli.py's handling of
ConfigError).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from relay import store
from relay.api import subscription_json
from relay.config import Settings
from relay.dashboard import ago, shown_text, timeline, utc
from relay.database import Database, open_database
from relay.errors import ConfigError
from relay.logs import shown_url
from relay.models import SubscriptionStatus
from relay.store import inspect, stats

COMMANDS = ("subscriptions", "stats")


def add_parsers(commands: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """The operator's subcommands, added to the `relay` parser's `commands`."""
    subs = commands.add_parser("subscriptions", help="inspect subscriptions (every key's)")
    actions = subs.add_subparsers(
        dest="subscriptions_command", required=True, parser_class=parser_class
    )
    listing = actions.add_parser("list", help="list subscriptions, newest first")
    listing.add_argument("--status", choices=[str(status) for status in SubscriptionStatus])
    listing.add_argument("--generation", metavar="GENERATION_ID")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (1-1000)")
    listing.add_argument("--json", action="store_true")
    show = actions.add_parser("show", help="one subscription: its deliveries and attempts")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    again = actions.add_parser("redeliver", help="send the stored final result again")
    again.add_argument("id")
    numbers = commands.add_parser("stats", help="the dashboard's numbers as a table")
    numbers.add_argument("--json", action="store_true")


def run(settings: Settings, args: argparse.Namespace) -> None:
    """Run an operator's command (the database is already migrated)."""

    async def main() -> None:
        db = open_database(settings.database_url)
        try:
            if args.command == "stats":
                await _stats(db, args.json)
            elif args.subscriptions_command == "list":
                await _list(db, args)
            elif args.subscriptions_command == "show":
                await _show(db, args.id, args.json)
            else:
                await _redeliver(db, args.id)
        finally:
            await db.dispose()

    asyncio.run(main())


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return utc(value)
    raise TypeError(f"cannot show {type(value).__name__}")


def _print_json(document: Any) -> None:
    print(json.dumps(document, default=_json_default, indent=2))


def _subscription(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A subscription as the API shows it, with its key, its URL and error made safe to show."""
    shown = subscription_json(row)
    shown.update(
        callback_url=shown_url(row["callback_url"]),
        last_error=shown_text(row["last_error"]) or None,
        key=row["key"],
        key_id=row["key_id"],
    )
    return shown


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


async def _list(db: Database, args: argparse.Namespace) -> None:
    if not 1 <= args.limit <= 1000:
        raise ConfigError("--limit", "must be between 1 and 1000")
    rows = await inspect.list_all_subscriptions(
        db, status=args.status, generation_id=args.generation, limit=args.limit
    )
    items = [_subscription(row) for row in rows]
    if args.json:
        _print_json(items)
        return
    if not items:
        print("no subscription matches")
        return
    header = ["id", "status", "attempts", "generation", "key", "created", "callback"]
    _table(
        [header]
        + [
            [
                item["id"],
                item["status"],
                str(item["attempts"]),
                item["generation_id"],
                item["key"],
                item["created_at"],
                item["callback_url"],
            ]
            for item in items
        ]
    )


async def _show(db: Database, sub_id: str, as_json: bool) -> None:
    found = await inspect.find(db, sub_id)
    if found is None or found.subscriptions[0]["id"] != sub_id:
        raise ConfigError("ID", f"no subscription with id {sub_id}")
    sub = _subscription(found.subscriptions[0])
    generation = found.generation
    assert generation is not None
    if as_json:
        _print_json(
            {
                "subscription": sub,
                "generation": {
                    key: generation[key]
                    for key in (
                        "id",
                        "state",
                        "status",
                        "poll_count",
                        "last_polled_at",
                        "next_poll_at",
                    )
                },
                "deliveries": [
                    {
                        "webhook_id": d["webhook_id"],
                        "event": d["event"],
                        "status": d["status"],
                        "attempts": d["attempts"],
                        "next_attempt_at": d["next_attempt_at"],
                        "last_error": shown_text(d["last_error"]) or None,
                        "created_at": d["created_at"],
                    }
                    for d in found.deliveries[sub_id]
                ],
                "attempts": [
                    {
                        "attempt": a["attempt"],
                        "webhook_id": a["webhook_id"],
                        "started_at": a["started_at"],
                        "duration_ms": a["duration_ms"],
                        "status_code": a["status_code"],
                        "error": shown_text(a["error"]) or None,
                    }
                    for a in found.attempts[sub_id]
                ],
            }
        )
        return
    state = generation["state"] + (f", {generation['status']}" if generation["status"] else "")
    _table(
        [
            ["subscription", sub["id"]],
            ["status", sub["status"]],
            ["generation", f"{sub['generation_id']} ({state})"],
            ["key", f"{sub['key']} ({sub['key_id']})"],
            ["callback", sub["callback_url"]],
            ["attempts", str(sub["attempts"])],
            ["last error", sub["last_error"] or "-"],
            ["created", sub["created_at"]],
            ["delivered", sub["delivered_at"] or "-"],
        ]
    )
    print("timeline:")
    for event in timeline(found, sub_id):
        detail = f"  ({event['detail']})" if event.get("detail") else ""
        print(f"  {utc(event['at'])}  {event['text']}{detail}")


async def _redeliver(db: Database, sub_id: str) -> None:
    try:
        row = await inspect.redeliver_any(db, sub_id)
    except store.RedeliverConflict as exc:
        raise ConfigError("ID", f"nothing to redeliver: {exc}") from None
    if row is None:
        raise ConfigError("ID", f"no subscription with id {sub_id}")
    print(f"queued {sub_id} for redelivery (status {row['status']}); a running relay sends it now")


async def _stats(db: Database, as_json: bool) -> None:
    overview = await stats.overview(db)
    minutes = await stats.attempts_per_minute(db, overview.at - timedelta(hours=1))
    delivered = sum(counts[0] for counts in minutes.values())
    failed = sum(counts[1] for counts in minutes.values())
    oldest = overview.oldest_delivery
    if as_json:
        _print_json(
            {
                "at": overview.at,
                "subscriptions": overview.subscriptions,
                "generations": overview.generations,
                "pending_deliveries": overview.backlog.pending_deliveries,
                "pending_generations": overview.backlog.pending_generations,
                "oldest_pending_delivery_at": overview.backlog.oldest_pending_delivery_at,
                "oldest_pending_subscription_id": oldest["subscription_id"] if oldest else None,
                "polls": {
                    "polling": overview.polls.polling,
                    "due": overview.polls.due,
                    "polled_last_minute": overview.polls.polled_last_minute,
                    "failing": overview.polls.failing,
                },
                "receivers": [
                    {
                        "host": h.host,
                        "pending": h.pending,
                        "oldest_at": h.oldest_at,
                        "last_error": shown_text(h.last_error) or None,
                    }
                    for h in overview.hosts
                ],
                "last_hour": {"delivered": delivered, "failed": failed},
            }
        )
        return
    now = overview.at

    def words(counts: Mapping[str, int]) -> str:
        return "  ".join(f"{word} {count}" for word, count in counts.items())

    oldest_text = "-"
    if oldest is not None:
        oldest_text = (
            f"{ago(oldest['created_at'], now)} ({oldest['subscription_id']} to {oldest['host']})"
        )
    polls = overview.polls
    _table(
        [
            ["subscriptions", words(overview.subscriptions)],
            ["generations", words(overview.generations)],
            ["pending callbacks", str(overview.backlog.pending_deliveries)],
            ["oldest pending", oldest_text],
            [
                "polling",
                f"{polls.polling} ({polls.due} due now, {polls.polled_last_minute} polled in the last minute)",
            ],
            ["failing polls", words(polls.failing)],
            ["last hour", f"delivered {delivered}  failed {failed}"],
        ]
    )
    if overview.hosts:
        print()
        _table(
            [["receiver", "pending", "oldest", "last error"]]
            + [
                [h.host, str(h.pending), ago(h.oldest_at, now), shown_text(h.last_error, 80)]
                for h in overview.hosts
            ]
        )
