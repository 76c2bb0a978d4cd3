"""Every query the relay makes. Nothing else writes SQL, benchmarks and tests included.

Units of work are short transactions. Claims of due work (`claim_due_generations`,
`claim_due_deliveries`) lease rows by pushing their due time to the end of the lease and
naming the owner; on PostgreSQL they use `FOR UPDATE SKIP LOCKED` so nodes never wait on each
other. Every completion checks that the caller still owns the lease, so a process whose lease
ran out cannot overwrite the work of the one that took over. The pattern is written once, in
_leases.py, for both leased tables.

Lock order, for every writer that takes more than one: key, then generation, then
deliveries, then subscriptions (create, cancel, revoke, record a poll, record attempts,
redeliver, record a create made through the relay; a create holds its keys shared, a
revocation its key exclusively). Nodes therefore
do not deadlock on each other in the common paths, and a transaction that still loses such a
race is retried whole (`_sql.retrying`). A subscription cannot be left active on a generation
that stopped polling: create and cancel both lock the generation row first.

One module per table family: keys.py (API keys); creates.py and subscriptions.py (the API's
side of subscriptions); proxied.py (the commit after a create through the relay) and
idempotency.py (its Idempotency-Keys); streams.py (generations followed through the
upstream's event stream instead of polled); generations.py (polls); hints.py and sweeps.py
(push hints and batch sweeps); state.py (the little every node must agree on);
deliveries.py and attempts.py (the outbox and what each attempt writes); housekeeping.py
(pruning); seeding.py (bulk states for benchmarks
and tests, not re-exported here). Callers use the names below as `store.<name>`. The store
imports no HTTP code.
"""

from __future__ import annotations

from relay.store._sql import storable
from relay.store.attempts import AttemptRecord, record_attempts
from relay.store.creates import (
    CreateBatchOutcome,
    CreateOptions,
    CreateRequest,
    CreateResult,
    FirstPoll,
    active_subscriptions,
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
from relay.store.hints import HintOutcome, IncomingHint, apply_hints, end_safety_net
from relay.store.housekeeping import prune, prune_hints
from relay.store.idempotency import (
    IdempotencyRecord,
    IdempotencyRef,
    RequestFingerprint,
    Settlement,
    StoredAnswer,
    claim_idempotency_key,
    prune_idempotency_keys,
    read_idempotency_key,
    renew_idempotency_key,
    settle_idempotency_key,
)
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
from relay.store.proxied import ProxiedCreate, ProxiedOutcome, record_proxied_create
from relay.store.state import (
    SharedState,
    note_hint,
    read_state,
    release_sweep,
    take_sweep,
    turn_sweeps_off,
)
from relay.store.streams import end_streams, renew_stream_leases
from relay.store.subscriptions import (
    RedeliverConflict,
    cancel_subscription,
    get_subscription,
    list_attempts,
    list_subscriptions,
    redeliver,
)
from relay.store.sweeps import SweepCounts, SweepResult, apply_sweep, sweep_counts

__all__ = [
    "AttemptRecord",
    "ClaimedDelivery",
    "ClaimedGeneration",
    "CreateBatchOutcome",
    "CreateOptions",
    "CreateRequest",
    "CreateResult",
    "FirstPoll",
    "HintOutcome",
    "HostDeferral",
    "IdempotencyRecord",
    "IdempotencyRef",
    "IncomingHint",
    "NewKey",
    "PollRecord",
    "ProxiedCreate",
    "ProxiedOutcome",
    "RedeliverConflict",
    "RequestFingerprint",
    "Revoked",
    "RotatedSecret",
    "Settlement",
    "SharedState",
    "StoredAnswer",
    "SweepCounts",
    "SweepResult",
    "active_subscriptions",
    "apply_hints",
    "apply_sweep",
    "authenticate",
    "cancel_subscription",
    "check_secret_key",
    "claim_due_deliveries",
    "claim_due_generations",
    "claim_idempotency_key",
    "create_key",
    "create_subscriptions",
    "defer_hosts",
    "end_safety_net",
    "end_streams",
    "get_subscription",
    "hash_api_key",
    "list_attempts",
    "list_keys",
    "list_subscriptions",
    "note_hint",
    "prune",
    "prune_hints",
    "prune_idempotency_keys",
    "read_idempotency_key",
    "read_state",
    "record_attempts",
    "record_polls",
    "record_proxied_create",
    "redeliver",
    "release_deliveries",
    "release_sweep",
    "renew_delivery_leases",
    "renew_generation_leases",
    "renew_idempotency_key",
    "renew_stream_leases",
    "reset_secrets",
    "revoke_key",
    "rotate_secret",
    "settle_idempotency_key",
    "storable",
    "sweep_counts",
    "take_sweep",
    "turn_sweeps_off",
]
