"""Redis implementations of the core's contracts (``service.core.contracts``)."""
