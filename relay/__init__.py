"""relay: a webhook bridge for asynchronous generation APIs."""

__version__ = "0.1.0"
