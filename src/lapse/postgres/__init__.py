"""The PostgreSQL gateway: ``[[postgres]]`` listeners that hold every connection to its session's clock."""

from .gateway import PostgresGateway, start_listeners

__all__ = ["PostgresGateway", "start_listeners"]
