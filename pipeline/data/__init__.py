"""Data library: reading instruction and preference files, recognising their format, converting rows to
canonical records; canonical datasets; the ROUGE-L novelty filter."""
