"""The core: the step contract and registry, plans, staleness and the engine. It imports nothing above it:
no format, publisher or step implementation."""
