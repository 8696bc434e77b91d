"""Model classes (plain Python, no Ray) and the Serve deployments that wrap them.

``tokenizer``, ``encoder``, ``heads``, ``bag_of_words`` and ``ensemble`` hold plain classes usable
without Ray; ``stage`` is the one generic Serve wrapper around them and ``gateway`` the FastAPI
ingress.
"""
