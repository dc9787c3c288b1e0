"""Frontend: the shop's entry point; fans out to catalog, cart and orders through the sidecar."""

from __future__ import annotations

import asyncio
import uuid
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

MAX_WATCH_UPDATES = 50
WATCH_INTERVAL_MS = 5
TRACK_INTERVAL_MS = 5


class Frontend(shop_pb2_grpc.FrontendServiceServicer):
    def __init__(self, instance: str, mesh: MeshChannel) -> None:
        self._instance = instance
        self._mesh = mesh

    async def _stubs(self) -> tuple[shop_pb2_grpc.CatalogServiceStub,
                                    shop_pb2_grpc.CartServiceStub,
                                    shop_pb2_grpc.OrderServiceStub]:
        channel = await self._mesh.get()
        return (shop_pb2_grpc.CatalogServiceStub(channel), shop_pb2_grpc.CartServiceStub(channel),
                shop_pb2_grpc.OrderServiceStub(channel))

    def _call_options(self, context: grpc.aio.ServicerContext) -> dict:
        return {"timeout": remaining_timeout(context), "metadata": outgoing_metadata(context)}

    async def BrowseCatalog(self, request: shop_pb2.BrowseCatalogRequest,
                            context: grpc.aio.ServicerContext
                            ) -> shop_pb2.BrowseCatalogResponse:
        catalog, _, _ = await self._stubs()
        reply = shop_pb2.BrowseCatalogResponse(served_by=self._instance)
        try:
            listing = await catalog.ListProducts(shop_pb2.ListProductsRequest(),
                                                 **self._call_options(context))
            reply.products.extend(listing.products)
            reply.catalog_served_by = listing.served_by
            watch = min(max(request.watch_updates, 0), MAX_WATCH_UPDATES)
            if watch:
                stream = catalog.WatchPrices(
                    shop_pb2.WatchPricesRequest(max_updates=watch,
                                                interval_ms=WATCH_INTERVAL_MS),
                    **self._call_options(context))
                async for update in stream:
                    reply.price_updates.append(update)
        except grpc.aio.AioRpcError as err:
            await relay_error(context, err, "catalog", self._instance)
        context.set_trailing_metadata(served_by(self._instance))
        return reply

    async def AddToCart(self, request: shop_pb2.AddToCartRequest,
                        context: grpc.aio.ServicerContext) -> shop_pb2.AddToCartResponse:
        catalog, cart, _ = await self._stubs()
        hop = "catalog"
        try:
            product = await catalog.GetProduct(
                shop_pb2.GetProductRequest(product_id=request.product_id),
                **self._call_options(context))
            hop = "cart"
            item = shop_pb2.CartItem(product_id=request.product_id,
                                     quantity=request.quantity or 1,
                                     unit_price_cents=product.product.price_cents)
            updated = await cart.AddItem(shop_pb2.AddItemRequest(user_id=request.user_id,
                                                                 item=item),
                                         **self._call_options(context))
        except grpc.aio.AioRpcError as err:
            await relay_error(context, err, hop, self._instance)
        context.set_trailing_metadata(served_by(self._instance))
        return shop_pb2.AddToCartResponse(cart=updated.cart, served_by=self._instance,
                                          catalog_served_by=product.served_by)

    async def PlaceOrder(self, request: shop_pb2.PlaceOrderRequest,
                         context: grpc.aio.ServicerContext) -> shop_pb2.PlaceOrderResponse:
        _, cart, orders = await self._stubs()
        hop = "cart"
        try:
            current = await cart.GetCart(shop_pb2.GetCartRequest(user_id=request.user_id),
                                         **self._call_options(context))
            if not current.cart.items:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the cart is empty",
                                    trailing_metadata=served_by(self._instance))
            hop = "orders"
            order = await orders.CreateOrder(
                shop_pb2.CreateOrderRequest(user_id=request.user_id, items=current.cart.items,
                                            request_id=uuid.uuid4().hex),
                **self._call_options(context))
            hop = "cart"
            await cart.EmptyCart(shop_pb2.EmptyCartRequest(user_id=request.user_id),
                                 **self._call_options(context))
        except grpc.aio.AioRpcError as err:
            await relay_error(context, err, hop, self._instance)
        context.set_trailing_metadata(served_by(self._instance))
        return shop_pb2.PlaceOrderResponse(order=order, served_by=self._instance)

    async def TrackOrder(self, request: shop_pb2.TrackOrderRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[shop_pb2.OrderStatus]:
        _, _, orders = await self._stubs()
        try:
            stream = orders.TrackOrder(
                shop_pb2.TrackOrderRequest(order_id=request.order_id,
                                           interval_ms=request.interval_ms or TRACK_INTERVAL_MS),
                **self._call_options(context))
            async for status in stream:
                yield status
        except grpc.aio.AioRpcError as err:
            await relay_error(context, err, "orders", self._instance)
        context.set_trailing_metadata(served_by(self._instance))


def main() -> None:
    parser = base_parser("frontend")
    add_mesh_flags(parser)
    args = parser.parse_args()
    mesh = MeshChannel(args.mesh, args.mesh_from_ready_file)
    servicer = Frontend(args.instance, mesh)
    asyncio.run(serve(
        port=args.port, instance=args.instance, ready_file=args.ready_file,
        register=lambda s: shop_pb2_grpc.add_FrontendServiceServicer_to_server(servicer, s),
        service_names=[shop_pb2.DESCRIPTOR.services_by_name["FrontendService"].full_name],
        on_stop=[mesh.close]))


if __name__ == "__main__":
    main()
