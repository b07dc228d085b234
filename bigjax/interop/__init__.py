"""Other libraries' model formats: Hugging Face directories in (hf.py)."""
