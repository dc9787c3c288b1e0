"""Catalog: the products and their prices, including a server stream of price changes."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import grpc
from demo.v1 import shop_pb2, shop_pb2_grpc

from demo_services.common import base_parser, serve, served_by

PRODUCTS = (
    ("p-espresso", "Espresso beans 1kg", 2490),
    ("p-grinder", "Burr grinder", 12900),
    ("p-kettle", "Gooseneck kettle", 5490),
    ("p-scale", "Coffee scale", 3290),
    ("p-dripper", "Pour-over dripper", 1990),
    ("p-filters", "Paper filters x100", 590),
    ("p-mug", "Ceramic mug", 1290),
    ("p-tamper", "Tamper 58mm", 2890),
)
MAX_INTERVAL_MS = 1000


class Catalog(shop_pb2_grpc.CatalogServiceServicer):
    def __init__(self, instance: str, seed: int | None = None) -> None:
        self._instance = instance
        self._products = {pid: shop_pb2.Product(id=pid, name=name, price_cents=price)
                          for pid, name, price in PRODUCTS}
        self._random = random.Random(seed)

    async def ListProducts(self, request: shop_pb2.ListProductsRequest,
                           context: grpc.aio.ServicerContext) -> shop_pb2.ListProductsResponse:
        context.set_trailing_metadata(served_by(self._instance))
        return shop_pb2.ListProductsResponse(products=self._products.values(),
                                             served_by=self._instance)

    async def GetProduct(self, request: shop_pb2.GetProductRequest,
                         context: grpc.aio.ServicerContext) -> shop_pb2.GetProductResponse:
        product = self._products.get(request.product_id)
        if product is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no product {request.product_id!r}",
                                trailing_metadata=served_by(self._instance))
        context.set_trailing_metadata(served_by(self._instance))
        return shop_pb2.GetProductResponse(product=product, served_by=self._instance)

    async def WatchPrices(self, request: shop_pb2.WatchPricesRequest,
                          context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[shop_pb2.PriceUpdate]:
        ids = list(request.product_ids) or list(self._products)
        unknown = [pid for pid in ids if pid not in self._products]
        if unknown:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no products {unknown}",
                                trailing_metadata=served_by(self._instance))
        context.set_trailing_metadata(served_by(self._instance))
        interval = min(max(request.interval_ms, 0), MAX_INTERVAL_MS) / 1000
        prices = {pid: self._products[pid].price_cents for pid in ids}
        sequence = 0
        while request.max_updates <= 0 or sequence < request.max_updates:
            if sequence:
                await asyncio.sleep(interval)
            pid = ids[sequence % len(ids)]
            # A bounded random walk (+-3%), private to this stream.
            base = self._products[pid].price_cents
            step = round(prices[pid] * self._random.uniform(-0.03, 0.03))
            prices[pid] = min(max(prices[pid] + step, base // 2), base * 2)
            sequence += 1
            yield shop_pb2.PriceUpdate(product_id=pid, price_cents=prices[pid],
                                       sequence=sequence, served_by=self._instance)


def main() -> None:
    parser = base_parser("catalog")
    parser.add_argument("--seed", type=int, default=None, help="seed of the price random walk")
    args = parser.parse_args()
    servicer = Catalog(args.instance, args.seed)
    asyncio.run(serve(
        port=args.port, instance=args.instance, ready_file=args.ready_file,
        register=lambda s: shop_pb2_grpc.add_CatalogServiceServicer_to_server(servicer, s),
        service_names=[shop_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name]))


if __name__ == "__main__":
    main()
