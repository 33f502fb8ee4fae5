"""The keys file read again while the gateway serves: when it changes (checked each second), and at once on SIGHUP
(the signal operators send a daemon to reread its configuration), as nginx and Envoy do."""

from __future__ import annotations

import signal

import trio

from sagellm.gateway.keys.tenants import Tenants

CHECK_S = 1.0


async def keep_keys_current(tenants: Tenants, on_sighup: bool, scope: trio.CancelScope) -> None:
    """Until `scope` is cancelled. `on_sighup`: this process handles signals (the CLI's gateway; not a test's, which
    runs in a thread)."""
    if tenants.keys_file is None:
        return
    with scope:
        async with trio.open_nursery() as nursery:
            if on_sighup:
                nursery.start_soon(_reload_on_sighup, tenants)
            while True:
                await trio.sleep(CHECK_S)
                tenants.reload()


async def _reload_on_sighup(tenants: Tenants) -> None:
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            tenants.reload(force=True)
