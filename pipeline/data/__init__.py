"""Data library: instruction and preference data.

- formats.py: the formats, their fields and `columns`, the errors; read.py: a local file as rows; detect.py: the
  format of the first rows; convert.py: a row as its canonical record
- dataset.py: canonical datasets (held-out split, length report, the kind of a dataset)
- rouge.py: the exact ROUGE-L novelty filter (dedup); rouge_histogram.py: the similarity histogram it reports
"""
