"""Adapters to external tools (llama.cpp, GPTQModel, torch devices): the rest of the code never imports the
tools themselves. Leaves: they import no quantforge layer above them."""
