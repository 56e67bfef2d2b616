"""Data stages: built-in datasets written as image files (``digits``), images turned into Parquet shards with a
manifest (``preprocess``, Ray Data), and the reader that every later stage uses on those shards (``dataset``)."""
