"""Scoring at serving time (the dense half): the ``Scorer`` interface the frontend depends on
(``scorer``), its torch implementation (``torch_scorer``: device choice, forward pass) and
``topk``."""
