"""The price catalog as this process knows it: genai-prices and the custom prices of the
database, reloaded when any replica changed them."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from ..domain.pricing import PriceCatalog
from ..storage import prices as stored_prices
from ..storage.db import Database


class LiveCatalog:
    """One PriceCatalog shared by the ingest writer, quotes and the prices service."""

    def __init__(self, prices: PriceCatalog | None = None) -> None:
        self.prices = prices or PriceCatalog()

    async def refresh(self, conn: AsyncConnection) -> None:
        """Reloads custom prices when any replica added one (checked at most once a second)."""
        if not self.prices.due():
            return
        revision = await stored_prices.price_catalog_revision(conn)
        if revision != self.prices.revision:
            self.prices.load_custom(await stored_prices.all_prices(conn), revision)
        self.prices.checked()

    async def refreshed(self, db: Database) -> PriceCatalog:
        """The catalog, reloaded first if it is due (outside any other transaction)."""
        if self.prices.due():
            async with db.read() as conn:
                await self.refresh(conn)
        return self.prices
