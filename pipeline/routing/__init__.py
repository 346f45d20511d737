"""The tiers above the expert: the OpenAI-compatible client, the cascade and the route search."""
