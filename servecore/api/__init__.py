"""Protocol fronts and what every front shares: HTTP errors, request/response schemas, API keys."""
