"""The `relay` command: serve, migrate, keys, fake-upstream; the operator's subscriptions and
stats commands are cli_ops.py's.

Bad arguments or configuration end the process with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from relay import __version__, cli_ops, logs
from relay.config import Settings
from relay.errors import ConfigError, StartupError
from relay.secretbox import SecretKeyError

if TYPE_CHECKING:
    from relay.database import Database

logger = logging.getLogger("relay")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"relay: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="relay", description="A webhook bridge for asynchronous generation APIs.")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the API and/or the background worker")
    serve.add_argument("--host", help="listen address (default RELAY_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default RELAY_PORT or 8080)")
    serve.add_argument("--role", choices=["all", "api", "worker"], default="all")

    commands.add_parser("migrate", help="apply database migrations and exit")

    keys = commands.add_parser("keys", help="manage client API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    create = key_commands.add_parser(
        "create", help="create a key; prints it and its signing secret once"
    )
    create.add_argument("--name", required=True)
    create.add_argument("--json", action="store_true")
    listing = key_commands.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--json", action="store_true")
    revoke = key_commands.add_parser("revoke", help="revoke a key at once and stop its work")
    revoke.add_argument("id")
    rotate = key_commands.add_parser(
        "rotate-secret", help="give a key a new signing secret; prints it once"
    )
    rotate.add_argument("id")
    rotate.add_argument(
        "--overlap",
        type=_overlap,
        default=86400.0,
        help="seconds callbacks also carry the old secret's signature (default 86400)",
    )
    rotate.add_argument("--json", action="store_true")
    reset = key_commands.add_parser(
        "reset-secrets",
        help="give every live key a new signing secret at once (after RELAY_SECRET_KEY was lost)",
    )
    reset.add_argument("--json", action="store_true")

    cli_ops.add_parsers(commands, _Parser)

    fake = commands.add_parser("fake-upstream", help="run the local upstream simulator")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8090)
    return parser


def _overlap(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError("must be a number of seconds, 0 or more")
    return value


def _fail(message: str) -> NoReturn:
    print(f"relay: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "fake-upstream":
            _fake_upstream(args)
            return
        settings = Settings.from_env()
        logs.configure(
            settings.log_level,
            settings.log_format,
            secrets=[settings.upstream_api_key, settings.admin_token],
        )
        if args.command == "serve":
            _serve(settings, args)
        elif args.command == "migrate":
            _migrate(_with_secret_key(settings, required=False))
            print("database is at the latest schema")
        elif args.command == "keys":
            _keys(settings, args)
        elif args.command in cli_ops.COMMANDS:
            _migrate(settings)
            cli_ops.run(settings, args)
    except ConfigError as exc:
        _fail(f"{exc}")
    except (StartupError, SecretKeyError) as exc:
        _fail(str(exc))


def _with_secret_key(settings: Settings, *, required: bool) -> Settings:
    """`settings` with the key that seals signing secrets: RELAY_SECRET_KEY, else on SQLite
    the key file beside the database (made on first use). On PostgreSQL there is no file:
    without RELAY_SECRET_KEY, a command that needs it stops here."""
    from relay.database import sqlite_path
    from relay.secretbox import key_file_path, read_or_create_key_file

    if settings.secret_key is not None:
        return settings
    path = sqlite_path(settings.database_url)
    if path is not None:
        key = read_or_create_key_file(key_file_path(path))
        return dataclasses.replace(settings, secret_key=key)
    if required:
        raise ConfigError(
            "RELAY_SECRET_KEY",
            "is required with PostgreSQL: signing secrets are stored sealed under it (at "
            "least 32 characters, e.g. from python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'; keep a copy as safe as the database)",
        )
    return settings


async def _check_secret_key(settings: Settings) -> None:
    """Stop with one line if the key cannot open the signing secrets already stored."""
    from relay import store
    from relay.database import open_database, sqlite_path

    db = open_database(settings.database_url, secret_key=settings.secret_key)
    try:
        await store.check_secret_key(db)
    except SecretKeyError:
        where = sqlite_path(settings.database_url)
        source = "RELAY_SECRET_KEY" if where is None else f"RELAY_SECRET_KEY or {where}.secret"
        raise StartupError(
            f"{source} cannot open the stored signing secrets (not the key they were sealed "
            "under, or it was lost): restore that key, or give every key a new secret with "
            "`relay keys reset-secrets` and hand the new secrets to their clients"
        ) from None
    finally:
        await db.dispose()


def _migrate(settings: Settings) -> None:
    from relay import migrate

    try:
        migrate.upgrade(settings.database_url, secret_key=settings.secret_key)
    except (OSError, ConnectionError) as exc:
        raise StartupError(f"cannot reach the database: {exc}") from None
    except Exception as exc:  # SQLAlchemy/driver errors carry the reason in their text
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StartupError(f"cannot migrate the database: {reason}") from None


def _serve(settings: Settings, args: argparse.Namespace) -> None:
    import uvicorn

    from relay.app import create_app
    from relay.database import hold_sqlite_serve_lock

    host = args.host or settings.host
    port = settings.port if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise ConfigError("--port", "must be between 0 and 65535")
    if args.role == "worker" and not settings.upstream_api_key:
        raise ConfigError("RELAY_UPSTREAM_API_KEY", "is required by the worker role")
    lock = hold_sqlite_serve_lock(settings.database_url)  # None on PostgreSQL
    settings = _with_secret_key(settings, required=True)
    _migrate(settings)
    asyncio.run(_check_secret_key(settings))
    if args.role in ("all", "api") and not settings.upstream_api_key:
        logger.warning(
            "RELAY_UPSTREAM_API_KEY is not set: polls and creates through the relay go out "
            "without a key and the upstream will refuse them; set it before real use",
            extra={"event": "config.upstream_key_missing"},
        )
    # Bind before anything starts, so a port in use is one clear line, not a worker that
    # started and a traceback.
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family)
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    app = create_app(settings, role=args.role)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level.lower(),
        # logs.configure has set uvicorn's loggers up: one format for every line.
        log_config=None,
        access_log=settings.access_log,
        lifespan="on",
        timeout_graceful_shutdown=10,
        # relay is not behind a proxy it trusts by default, and the headers cost per request
        proxy_headers=False,
        server_header=False,
        # Beyond this many open connections (or requests in flight) a request gets 503.
        limit_concurrency=settings.max_connections,
    )
    bound_port = sock.getsockname()[1]
    logger.info(
        "listening on http://%s:%d (role %s)",
        host,
        bound_port,
        args.role,
        extra={"event": "relay.listening", "host": host, "port": bound_port, "role": args.role},
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        if lock is not None:
            lock.close()


def _keys(settings: Settings, args: argparse.Namespace) -> None:
    from relay import store
    from relay.database import open_database

    needs_key = args.keys_command in {"create", "rotate-secret", "reset-secrets"}
    settings = _with_secret_key(settings, required=needs_key)
    _migrate(settings)
    if args.keys_command == "rotate-secret":
        asyncio.run(_check_secret_key(settings))

    async def run() -> None:
        db = open_database(settings.database_url, secret_key=settings.secret_key)
        try:
            if args.keys_command == "create":
                name = args.name.strip()
                if not name or len(name) > 200:
                    raise ConfigError("--name", "must be 1-200 characters")
                key = await store.create_key(db, name)
                if args.json:
                    print(
                        json.dumps(
                            {
                                "id": key.id,
                                "name": key.name,
                                "api_key": key.api_key,
                                "signing_secret": key.signing_secret,
                            }
                        )
                    )
                else:
                    print(f"id:             {key.id}")
                    print(f"name:           {key.name}")
                    print(f"api key:        {key.api_key}")
                    print(f"signing secret: {key.signing_secret}")
                    print(
                        "Store both now: the API key is kept only as a hash and is not shown again."
                    )
            elif args.keys_command == "list":
                rows = await store.list_keys(db)
                items = [
                    {
                        "id": row["id"],
                        "name": row["name"],
                        "key_prefix": row["key_prefix"],
                        "created_at": row["created_at"].isoformat(),
                        "revoked_at": row["revoked_at"].isoformat() if row["revoked_at"] else None,
                    }
                    for row in rows
                ]
                if args.json:
                    print(json.dumps(items))
                else:
                    for item in items:
                        state = f"revoked {item['revoked_at']}" if item["revoked_at"] else "active"
                        print(f"{item['id']}  {item['key_prefix']}...  {item['name']}  ({state})")
            elif args.keys_command == "revoke":
                revoked = await store.revoke_key(db, args.id)
                if revoked is None:
                    raise ConfigError("ID", f"no key with id {args.id}")
                print(
                    f"revoked {args.id}: {revoked.subscriptions_canceled} active subscriptions "
                    f"canceled, {revoked.generations_stopped} generations no longer polled"
                )
            elif args.keys_command == "rotate-secret":
                await _rotate(db, args)
            elif args.keys_command == "reset-secrets":
                await _reset(db, args)
        finally:
            await db.dispose()

    asyncio.run(run())


async def _rotate(db: Database, args: argparse.Namespace) -> None:
    from relay import store

    rotated = await store.rotate_secret(db, args.id, args.overlap)
    if rotated is None:
        raise ConfigError("ID", f"no live key with id {args.id}")
    until = rotated.overlap_until.isoformat() if rotated.overlap_until else None
    if args.json:
        print(
            json.dumps(
                {"id": rotated.id, "signing_secret": rotated.signing_secret, "overlap_until": until}
            )
        )
        return
    print(f"id:             {rotated.id}")
    print(f"signing secret: {rotated.signing_secret}")
    if until:
        print(f"Callbacks carry the old secret's signature too until {until}.")
    else:
        print("Callbacks carry only the new secret's signature from now on.")
    print("Store the secret now: it is not shown again.")


async def _reset(db: Database, args: argparse.Namespace) -> None:
    from relay import store

    fresh = await store.reset_secrets(db)
    items = [{"id": k.id, "name": k.name, "signing_secret": k.signing_secret} for k in fresh]
    if args.json:
        print(json.dumps(items))
        return
    for item in items:
        print(f"{item['id']}  {item['name']}  {item['signing_secret']}")
    print(f"{len(items)} keys have new signing secrets; hand each to its client now.")


def _fake_upstream(args: argparse.Namespace) -> None:
    from relay.simulator import FakeUpstreamConfig, run_fake_upstream

    try:
        config = FakeUpstreamConfig.from_env(os.environ)
    except ValueError as exc:
        _fail(str(exc))
    if not 0 <= args.port <= 65535:
        _fail("--port: must be between 0 and 65535")
    run_fake_upstream(args.host, args.port, config)


if __name__ == "__main__":
    main()
