"""Exports of a grown model: a plain Hugging Face directory (``hf_directory``)."""
