"""Embeddings as files: the ``.npz`` format, CSV tables (whole and streamed), Parquet, and the mixing rules.

- :mod:`.embedding`: one embedding and its metadata (``.npz``);
- :mod:`.settings`: which metadata must agree before embeddings are mixed, and how a difference is named;
- :mod:`.csv_format`: the CSV's columns and rows; :mod:`.table` reads and writes a table whole,
  :mod:`.stream` indexes and appends to one that may not fit in memory;
- :mod:`.parquet`: a finished table as Parquet.

Nothing here imports PyTorch.
"""
