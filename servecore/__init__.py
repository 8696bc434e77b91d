"""Plain-Python core shared by the Serve graph, the Ray Data pipelines and the CLIs.

Nothing here imports Ray at module level, starts anything, or touches MLflow on import.
"""

LABELS: tuple[str, ...] = (
    "billing",
    "delivery",
    "returns",
    "technical_issue",
    "account_access",
    "general_inquiry",
)
