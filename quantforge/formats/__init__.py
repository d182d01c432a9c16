"""Output formats: one module each (gguf, gptq, awq), registered with `core.formats.register_format`.

A format owns its settings model (the `formats.<name>` block of targets.yaml), the steps that make and check
its artifacts, the files it publishes and its section of the model card (a template in quantforge/templates).
Adding one: a new module here, its card template, and its name in `pipeline.FORMAT_MODULES`.
"""
