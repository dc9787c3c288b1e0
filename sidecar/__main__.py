"""`mesh-sidecar`: flags -> config -> run -> drain on SIGTERM/SIGINT -> exit 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from sidecar.config import parse
from sidecar.identity import IdentityError
from sidecar.runtime import Sidecar
from sidecar.xds_translate import ConfigError


async def _run(sidecar: Sidecar) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await sidecar.start()
    client = None
    if sidecar.settings.control_plane:
        from sidecar.control_plane_link import follow_control_plane
        client = await follow_control_plane(sidecar, sidecar.settings)
    await stop.wait()
    logging.getLogger("sidecar").info("draining (up to %.1fs)", sidecar.settings.drain_timeout)
    if client is not None:
        await client.stop()
    await sidecar.drain()


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse(argv)
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_run(Sidecar(settings)))
    except IdentityError as exc:
        print(f"mesh-sidecar: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"mesh-sidecar: invalid config: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mesh-sidecar: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
