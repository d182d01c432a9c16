"""targets.yaml: the schema (schema.py) and the loader (loader.py). A leaf: it imports no other layer."""
