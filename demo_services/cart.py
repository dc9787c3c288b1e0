"""Cart: each user's cart, in memory."""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import grpc
from demo.v1 import shop_pb2, shop_pb2_grpc

from demo_services.common import base_parser, serve, served_by

MAX_USERS = 10_000  # oldest carts are forgotten first, so memory stays bounded
MAX_QUANTITY = 1000


class CartStore(shop_pb2_grpc.CartServiceServicer):
    def __init__(self, instance: str) -> None:
        self._instance = instance
        # user -> product -> CartItem
        self._carts: OrderedDict[str, dict[str, shop_pb2.CartItem]] = OrderedDict()

    def _reply(self, user_id: str, context: grpc.aio.ServicerContext) -> shop_pb2.CartResponse:
        context.set_trailing_metadata(served_by(self._instance))
        items = self._carts.get(user_id, {}).values()
        return shop_pb2.CartResponse(cart=shop_pb2.Cart(user_id=user_id, items=items),
                                     served_by=self._instance)

    async def _check_user(self, user_id: str, context: grpc.aio.ServicerContext) -> None:
        if not user_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user_id is required",
                                trailing_metadata=served_by(self._instance))

    async def AddItem(self, request: shop_pb2.AddItemRequest,
                      context: grpc.aio.ServicerContext) -> shop_pb2.CartResponse:
        await self._check_user(request.user_id, context)
        item = request.item
        if not item.product_id or item.quantity <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "item needs a product_id and a positive quantity",
                                trailing_metadata=served_by(self._instance))
        cart = self._carts.setdefault(request.user_id, {})
        self._carts.move_to_end(request.user_id)
        while len(self._carts) > MAX_USERS:
            self._carts.popitem(last=False)
        line = cart.setdefault(item.product_id, shop_pb2.CartItem(product_id=item.product_id))
        line.quantity = min(line.quantity + item.quantity, MAX_QUANTITY)
        line.unit_price_cents = item.unit_price_cents
        return self._reply(request.user_id, context)

    async def GetCart(self, request: shop_pb2.GetCartRequest,
                      context: grpc.aio.ServicerContext) -> shop_pb2.CartResponse:
        await self._check_user(request.user_id, context)
        return self._reply(request.user_id, context)

    async def EmptyCart(self, request: shop_pb2.EmptyCartRequest,
                        context: grpc.aio.ServicerContext) -> shop_pb2.CartResponse:
        await self._check_user(request.user_id, context)
        self._carts.pop(request.user_id, None)
        return self._reply(request.user_id, context)


def main() -> None:
    args = base_parser("cart").parse_args()
    servicer = CartStore(args.instance)
    asyncio.run(serve(
        port=args.port, instance=args.instance, ready_file=args.ready_file,
        register=lambda s: shop_pb2_grpc.add_CartServiceServicer_to_server(servicer, s),
        service_names=[shop_pb2.DESCRIPTOR.services_by_name["CartService"].full_name]))


if __name__ == "__main__":
    main()
