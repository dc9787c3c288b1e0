"""Payments: takes charges; can fail a fraction of them or be slow, for retry and timeout demos."""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict

import grpc
from demo.v1 import shop_pb2, shop_pb2_grpc

from demo_services.common import base_parser, serve, served_by

MAX_REMEMBERED_KEYS = 10_000


class Payments(shop_pb2_grpc.PaymentServiceServicer):
    def __init__(self, instance: str, fail_rate: float = 0.0, delay_ms: int = 0,
                 seed: int | None = None) -> None:
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError("fail rate must be within [0, 1]")
        self._instance = instance
        self._fail_rate = fail_rate
        self._delay = delay_ms / 1000
        self._random = random.Random(seed)
        self._count = 0
        # idempotency key -> transaction id: a retried charge gets the first one's answer.
        self._done: OrderedDict[str, str] = OrderedDict()

    async def Charge(self, request: shop_pb2.ChargeRequest,
                     context: grpc.aio.ServicerContext) -> shop_pb2.ChargeResponse:
        trailers = served_by(self._instance)
        if self._delay:
            await asyncio.sleep(self._delay)
        if self._fail_rate and self._random.random() < self._fail_rate:
            # Before any side effect, as a real overloaded server would: safe to retry.
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"{self._instance}: simulated outage (--fail-rate)",
                                trailing_metadata=trailers)
        if request.amount_cents <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "amount must be positive",
                                trailing_metadata=trailers)
        key = request.idempotency_key
        txn = self._done.get(key) if key else None
        if txn is None:
            self._count += 1
            txn = f"{self._instance}-txn-{self._count}"
            if key:
                self._done[key] = txn
                while len(self._done) > MAX_REMEMBERED_KEYS:
                    self._done.popitem(last=False)
        context.set_trailing_metadata(trailers)
        return shop_pb2.ChargeResponse(transaction_id=txn, served_by=self._instance)


def main() -> None:
    parser = base_parser("payments")
    parser.add_argument("--fail-rate", type=float, default=0.0,
                        help="fraction of charges (0..1) that fail with UNAVAILABLE")
    parser.add_argument("--delay-ms", type=int, default=0, help="added latency per charge")
    parser.add_argument("--seed", type=int, default=None, help="seed for --fail-rate")
    args = parser.parse_args()
    if not 0.0 <= args.fail_rate <= 1.0:
        parser.error("--fail-rate must be within [0, 1]")
    servicer = Payments(args.instance, args.fail_rate, args.delay_ms, args.seed)
    asyncio.run(serve(
        port=args.port, instance=args.instance, ready_file=args.ready_file,
        register=lambda s: shop_pb2_grpc.add_PaymentServiceServicer_to_server(servicer, s),
        service_names=[shop_pb2.DESCRIPTOR.services_by_name["PaymentService"].full_name]))


if __name__ == "__main__":
    main()
