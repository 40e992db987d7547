"""The DVC stages, one module each: ``Paths``, ``load_config``, ``run`` and ``main`` (:mod:`pipeline.stage`)."""
