"""Adapters for Hugging Face transformers and Megatron-Core (imported as `comet.integrations`)."""
