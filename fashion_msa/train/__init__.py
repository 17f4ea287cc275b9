"""fashion_msa.train."""
