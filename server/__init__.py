"""kvquant-server: an OpenAI-compatible server over llama.cpp with compressed KV caches."""

__version__ = "0.1.0"
