"""fashion_msa.model."""
