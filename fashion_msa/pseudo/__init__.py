"""fashion_msa.pseudo."""
