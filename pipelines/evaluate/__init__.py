"""Evaluation: sample quality against a real-vs-real floor (``quality``), the FD-cls feature classifier
(``classifier``) and the promotion gate that acts on the scores (``gate``)."""
