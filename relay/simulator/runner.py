"""run_fake_upstream: the simulator under uvicorn, what `relay fake-upstream` runs.

It must not read the environment (the CLI builds the config with `from_env`).
"""

from __future__ import annotations

import uvicorn

from relay.simulator.app import create_fake_upstream
from relay.simulator.config import FakeUpstreamConfig


def run_fake_upstream(host: str, port: int, config: FakeUpstreamConfig) -> None:
    """Serve the simulator under uvicorn until interrupted (what `relay fake-upstream` runs)."""
    key = "any bearer key" if config.api_key is None else "the key in RELAY_FAKE_API_KEY"
    print(  # noqa: T201 (the one line a person starting it by hand wants to see)
        f"relay fake-upstream: http://{host}:{port}/v1/generation/{{id}} (accepts {key}; "
        f"seed {config.seed}, time scale {config.time_scale:g})",
        flush=True,
    )
    uvicorn.run(
        create_fake_upstream(config),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        # Polls held by a hang fault must not keep Ctrl-C waiting for an hour.
        timeout_graceful_shutdown=1,
    )
