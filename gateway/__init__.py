"""The asyncio gRPC gateway: validates requests, queues them, and returns the results."""
