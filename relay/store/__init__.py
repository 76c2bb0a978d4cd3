"""Every query the relay makes. Nothing else writes SQL, benchmarks and tests included.

Units of work are short transactions. Claims of due work (`claim_due_generations`,
`claim_due_deliveries`) lease rows by pushing their due time to the end of the lease and
naming the owner; on PostgreSQL they use `FOR UPDATE SKIP LOCKED` so nodes never wait on each
other. Every completion checks that the caller still owns the lease, so a process whose lease
ran out cannot overwrite the work of the one that took over. The pattern is written once, in
_leases.py, for both leased tables.

Lock order, for every writer that takes more than one: key, then generation, then
deliveries, then subscriptions (create, cancel, revoke, record a poll, record attempts,
redeliver; a create holds its keys shared, a revocation its key exclusively). Nodes therefore
do not deadlock on each other in the common paths, and a transaction that still loses such a
race is retried whole (`_sql.retrying`). A subscription cannot be left active on a generation
that stopped polling: create and cancel both lock the generation row first.

One module per table family: keys.py (API keys); creates.py and subscriptions.py (the API's
side of subscriptions); generations.py (polls); deliveries.py and attempts.py (the outbox and
what each attempt writes); housekeeping.py (pruning); seeding.py (bulk states for benchmarks
and tests, not re-exported here). Callers use the names below as `store.<name>`. The store
imports no HTTP code.
"""

from __future__ import annotations

from relay.store._sql import storable
from relay.store.attempts import AttemptRecord, record_attempts
from relay.store.creates import (
    CreateBatchOutcome,
    CreateRequest,
    CreateResult,
    create_subscriptions,
)
from relay.store.deliveries import (
    ClaimedDelivery,
    HostDeferral,
    claim_due_deliveries,
    defer_hosts,
    release_deliveries,
    renew_delivery_leases,
)
from relay.store.generations import (
    ClaimedGeneration,
    PollRecord,
    claim_due_generations,
    record_polls,
    renew_generation_leases,
)
from relay.store.housekeeping import prune
from relay.store.keys import (
    NewKey,
    Revoked,
    RotatedSecret,
    authenticate,
    check_secret_key,
    create_key,
    hash_api_key,
    list_keys,
    reset_secrets,
    revoke_key,
    rotate_secret,
)
from relay.store.subscriptions import (
    RedeliverConflict,
    cancel_subscription,
    get_subscription,
    list_attempts,
    list_subscriptions,
    redeliver,
)

__all__ = [
    "AttemptRecord",
    "ClaimedDelivery",
    "ClaimedGeneration",
    "CreateBatchOutcome",
    "CreateRequest",
    "CreateResult",
    "HostDeferral",
    "NewKey",
    "PollRecord",
    "RedeliverConflict",
    "Revoked",
    "RotatedSecret",
    "authenticate",
    "cancel_subscription",
    "check_secret_key",
    "claim_due_deliveries",
    "claim_due_generations",
    "create_key",
    "create_subscriptions",
    "defer_hosts",
    "get_subscription",
    "hash_api_key",
    "list_attempts",
    "list_keys",
    "list_subscriptions",
    "prune",
    "record_attempts",
    "record_polls",
    "redeliver",
    "release_deliveries",
    "renew_delivery_leases",
    "renew_generation_leases",
    "reset_secrets",
    "revoke_key",
    "rotate_secret",
    "storable",
]
