"""Load generator: simulated shoppers calling the frontend at a fixed overall rate.

Each shopper repeats a journey — browse (with a price stream), add one or two items, place the
order, track it (a stream relayed by the frontend from orders) — and every step waits for the
next slot of a shared pacer, so the rate holds however slow the calls are. Run by run.py, or
alone: `python -m demo_services.loadgen --target HOST:PORT --duration 10`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import grpc
from demo.v1 import shop_pb2, shop_pb2_grpc

from demo_services.catalog import PRODUCTS
from demo_services.stats import LoadStats, format_summary

CALL_TIMEOUT = 3.0
STOP_GRACE = CALL_TIMEOUT + 1.0  # calls in flight when the run ends get this long to finish


class Pacer:
    """Hands out call slots at a fixed rate, shared by all shoppers.

    If the shoppers fall behind (all busy on slow calls) the missed slots are dropped rather
    than sent later in a burst: the demo should show a slow mesh, not hammer it.
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._interval = 1.0 / rate
        self._clock = clock
        self._next = clock()

    def reserve(self) -> float:
        """Take the next slot; returns how long to wait for it."""
        now = self._clock()
        if self._next < now - 1.0:
            self._next = now
        slot, self._next = self._next, self._next + self._interval
        return max(0.0, slot - now)


class Shopper:
    def __init__(self, user: str, stub: shop_pb2_grpc.FrontendServiceStub, stats: LoadStats,
                 pacer: Pacer, stop: asyncio.Event, rng: random.Random) -> None:
        self._user = user
        self._stub = stub
        self._stats = stats
        self._pacer = pacer
        self._stop = stop
        self._rng = rng

    async def _slot(self) -> bool:
        delay = self._pacer.reserve()
        if delay:
            await asyncio.sleep(delay)
        return not self._stop.is_set()

    async def _call(self, method: str, call: Any,
                    served: Callable[[Any], list[tuple[str, str]]] | None = None) -> Any:
        """Time one call already issued (the RPC starts when the loop next runs); returns the
        response (a list for streams) or None on error."""
        started = time.monotonic()
        try:
            if isinstance(call, grpc.aio.UnaryStreamCall):
                response: Any = [msg async for msg in call]
            else:
                response = await call
            code = "OK"
        except grpc.aio.AioRpcError as err:
            response, code = None, err.code().name
        now = time.monotonic()
        self._stats.record(now, method, (now - started) * 1000, code,
                           served(response) if served and response is not None else ())
        return response

    async def run(self) -> None:
        stub, user = self._stub, self._user
        while await self._slot():
            await self._call(
                "BrowseCatalog",
                stub.BrowseCatalog(shop_pb2.BrowseCatalogRequest(user_id=user, watch_updates=3),
                                   timeout=CALL_TIMEOUT),
                lambda r: [("catalog", r.catalog_served_by),
                           *(("catalog", u.served_by) for u in r.price_updates[:1])])
            for _ in range(self._rng.randint(1, 2)):
                if not await self._slot():
                    return
                request = shop_pb2.AddToCartRequest(user_id=user,
                                                    product_id=self._rng.choice(PRODUCTS)[0],
                                                    quantity=self._rng.randint(1, 3))
                await self._call("AddToCart", stub.AddToCart(request, timeout=CALL_TIMEOUT),
                                 lambda r: [("catalog", r.catalog_served_by)])
            if not await self._slot():
                return
            placed = await self._call(
                "PlaceOrder",
                stub.PlaceOrder(shop_pb2.PlaceOrderRequest(user_id=user), timeout=CALL_TIMEOUT),
                lambda r: [("payments", r.order.payment_served_by)])
            if placed is None or not await self._slot():
                continue
            await self._call("TrackOrder", stub.TrackOrder(
                shop_pb2.TrackOrderRequest(order_id=placed.order.order_id),
                timeout=CALL_TIMEOUT))


async def run_load(target: str, *, rps: float, duration: float | None, users: int,
                   stop: asyncio.Event, on_progress: Callable[[str], None],
                   seed: int | None = None) -> LoadStats:
    """Drive the frontend at `target` until `duration` passes or `stop` is set."""
    stats = LoadStats(started=time.monotonic())
    pacer = Pacer(rps)
    rng = random.Random(seed)
    done = asyncio.Event()  # the shoppers' own stop: set by `stop` or by the duration
    async with grpc.aio.insecure_channel(target) as channel:
        stub = shop_pb2_grpc.FrontendServiceStub(channel)
        shoppers = [asyncio.create_task(
            Shopper(f"user-{i}", stub, stats, pacer, done, random.Random(rng.random())).run())
            for i in range(users)]

        async def report() -> None:
            while True:
                await asyncio.sleep(1.0)
                on_progress(stats.progress_line(time.monotonic()))

        reporter = asyncio.create_task(report())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([stopper], timeout=duration)
        done.set()
        stats.stopped = time.monotonic()
        stopper.cancel()
        reporter.cancel()  # the summary follows; no partial-second rates while calls finish
        _, late = await asyncio.wait(shoppers, timeout=STOP_GRACE)
        for task in late:
            task.cancel()
        await asyncio.gather(*shoppers, reporter, stopper, return_exceptions=True)
    return stats


class ProgressPrinter:
    """One line, rewritten in place on a terminal; one line per report otherwise (logs, tests).

    Output is best effort: a closed pipe (`make demo | head`) must not stop the demo from
    stopping its processes, so write errors switch output off instead of raising.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stdout
        self._tty = self._stream.isatty()
        self._open_line = False
        self._broken = False

    def _write(self, text: str) -> None:
        if self._broken:
            return
        try:
            self._stream.write(text)
            self._stream.flush()
        except OSError:
            self._broken = True
            if self._stream is sys.stdout:  # or Python's exit-time flush complains again
                sys.stdout = open(os.devnull, "w")  # lives until exit

    def __call__(self, line: str) -> None:
        if self._tty:
            # A wrapped line cannot be rewritten with \r: cut it to the terminal's width.
            width = shutil.get_terminal_size().columns
            self._write("\r" + line[:max(width - 1, 20)] + "\x1b[K")
            self._open_line = True
        else:
            self._write(line + "\n")

    def say(self, text: str) -> None:
        """A message of its own, between progress lines."""
        self.finish()
        self._write(text + "\n")

    notice = say

    def finish(self) -> None:
        if self._open_line:
            self._open_line = False
            self._write("\n")


def add_load_flags(p: argparse.ArgumentParser) -> None:
    # Each frontend call fans out to about two more calls, each through two sidecars: at 50 rps
    # the whole demo took ~0.85 of a core on a 2-core VM, so the default is lower.
    p.add_argument("--rps", type=float, default=20.0,
                   help="calls per second to the frontend, all shoppers together")
    p.add_argument("--users", type=int, default=16, help="concurrent simulated shoppers")
    p.add_argument("--duration", type=float, default=None,
                   help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--seed", type=int, default=None, help="seed of the shoppers' choices")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo_services.loadgen", description=__doc__)
    p.add_argument("--target", required=True,
                   help="HOST:PORT serving demo.v1.FrontendService (a sidecar's outbound)")
    add_load_flags(p)
    args = p.parse_args(argv)

    async def go() -> LoadStats:
        import signal
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        printer = ProgressPrinter()
        try:
            return await run_load(args.target, rps=args.rps, duration=args.duration,
                                  users=args.users, stop=stop, on_progress=printer,
                                  seed=args.seed)
        finally:
            printer.finish()

    stats = asyncio.run(go())
    ProgressPrinter().say(format_summary(stats.summary(time.monotonic())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
