"""Orders: turns a cart into an order by charging payments (through the sidecar)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator

import grpc
from demo.v1 import shop_pb2, shop_pb2_grpc

from demo_services.common import (
    MeshChannel,
    add_mesh_flags,
    base_parser,
    outgoing_metadata,
    relay_error,
    remaining_timeout,
    serve,
    served_by,
)

MAX_ORDERS = 10_000  # oldest orders are forgotten first, so memory stays bounded
MAX_INTERVAL_MS = 1000
STATES = (shop_pb2.ORDER_STATE_PLACED, shop_pb2.ORDER_STATE_PAID,
          shop_pb2.ORDER_STATE_SHIPPED, shop_pb2.ORDER_STATE_DELIVERED)


class Orders(shop_pb2_grpc.OrderServiceServicer):
    def __init__(self, instance: str, mesh: MeshChannel) -> None:
        self._instance = instance
        self._mesh = mesh
        self._orders: OrderedDict[str, shop_pb2.Order] = OrderedDict()
        self._count = 0

    async def CreateOrder(self, request: shop_pb2.CreateOrderRequest,
                          context: grpc.aio.ServicerContext) -> shop_pb2.Order:
        trailers = served_by(self._instance)
        if not request.user_id or not request.items:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "an order needs a user_id and at least one item",
                                trailing_metadata=trailers)
        total = sum(item.quantity * item.unit_price_cents for item in request.items)
        payments = shop_pb2_grpc.PaymentServiceStub(await self._mesh.get())
        try:
            charge = await payments.Charge(
                shop_pb2.ChargeRequest(user_id=request.user_id, amount_cents=total,
                                       idempotency_key=request.request_id),
                timeout=remaining_timeout(context), metadata=outgoing_metadata(context))
        except grpc.aio.AioRpcError as err:
            await relay_error(context, err, "payments", self._instance)
        self._count += 1
        order = shop_pb2.Order(order_id=f"{self._instance}-order-{self._count}",
                               user_id=request.user_id, items=request.items, total_cents=total,
                               transaction_id=charge.transaction_id,
                               payment_served_by=charge.served_by, served_by=self._instance)
        self._orders[order.order_id] = order
        while len(self._orders) > MAX_ORDERS:
            self._orders.popitem(last=False)
        context.set_trailing_metadata(trailers)
        return order

    async def TrackOrder(self, request: shop_pb2.TrackOrderRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[shop_pb2.OrderStatus]:
        if request.order_id not in self._orders:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no order {request.order_id!r}",
                                trailing_metadata=served_by(self._instance))
        context.set_trailing_metadata(served_by(self._instance))
        interval = min(max(request.interval_ms, 0), MAX_INTERVAL_MS) / 1000
        for i, state in enumerate(STATES):
            if i:
                await asyncio.sleep(interval)
            yield shop_pb2.OrderStatus(order_id=request.order_id, state=state,
                                       served_by=self._instance)


def main() -> None:
    parser = base_parser("orders")
    add_mesh_flags(parser)
    args = parser.parse_args()
    mesh = MeshChannel(args.mesh, args.mesh_from_ready_file)
    servicer = Orders(args.instance, mesh)
    asyncio.run(serve(
        port=args.port, instance=args.instance, ready_file=args.ready_file,
        register=lambda s: shop_pb2_grpc.add_OrderServiceServicer_to_server(servicer, s),
        service_names=[shop_pb2.DESCRIPTOR.services_by_name["OrderService"].full_name],
        on_stop=[mesh.close]))


if __name__ == "__main__":
    main()
