"""fashion_msa.data."""
