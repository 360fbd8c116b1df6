"""Fixtures shared by the rollout system tests (rollout, webhooks, annotations)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.upstreams import UpstreamHost
from tests.system.test_rollout_e2e import FlakyUpstream


@pytest.fixture
def upstreams(upstream_host: UpstreamHost) -> Iterator[dict[str, FlakyUpstream]]:
    """A baseline (blue) and a canary whose 5xx share each test sets."""
    made = {"blue": FlakyUpstream("blue"), "canary": FlakyUpstream("canary")}
    for upstream in made.values():
        upstream_host.call(upstream.start())
    yield made
    for upstream in made.values():
        upstream_host.call(upstream.stop())
