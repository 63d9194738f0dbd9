"""widen inside other training frameworks (hf: Hugging Face Trainer callbacks)."""
