"""fashion_msa.clip."""
