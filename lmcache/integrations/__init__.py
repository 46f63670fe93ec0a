"""Engine integrations: transformers (runs on the CPU here) and vLLM."""
