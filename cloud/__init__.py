"""The cloud worker: aiohttp service that runs the tail of split models."""
