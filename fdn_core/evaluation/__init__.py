"""Model evaluation (paper 4.4.1-4.4.4), retrieval evaluation (Table 2 protocol) and their metrics."""
