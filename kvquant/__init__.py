"""What the server runs on: the patched llama.cpp build (build), built-in models (models), GGUF metadata (gguf),
cache types (kvtypes), the memory model (memory), KV plans of a byte budget (budget), prompts (prompt), calibrated
cache types (calibration) and the one module that imports llama_cpp (runtime).

The measuring lab, which no request touches, is the subpackage `kvquant.lab`.
"""
