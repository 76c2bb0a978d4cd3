"""docs/grafana/relay.json: valid JSON whose every query names metrics relay exposes, laid out
without overlapping panels."""

from __future__ import annotations

import json
import re
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from relay.metrics import Metrics
from tests.helpers import ROOT

DASHBOARD = ROOT / "docs" / "grafana" / "relay.json"


def _panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    return panels


def test_every_query_names_a_metric_relay_exposes() -> None:
    """Each relay_* name in a panel's query is a sample relay's /metrics has."""
    exposed = {
        sample.name
        for family in text_string_to_metric_families(Metrics(enabled=True).exposition().decode())
        for sample in family.samples
    }
    queried = set()
    for panel in _panels():
        for target in panel.get("targets", []):
            queried.update(re.findall(r"\brelay_[a-z0-9_]+", target["expr"]))
    assert queried, "no query names a relay metric"
    assert queried <= exposed, sorted(queried - exposed)
    assert {"relay_pending_deliveries", "relay_delivery_attempts_total"} <= queried


def test_panels_do_not_overlap() -> None:
    """No two panels share a cell of the 24-column grid."""
    taken: dict[tuple[int, int], str] = {}
    for panel in _panels():
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, (panel["title"], taken.get((x, y)))
                taken[(x, y)] = panel["title"]
        assert grid["x"] + grid["w"] <= 24
