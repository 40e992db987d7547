"""varscale's pipeline: one module per DVC stage in ``stages/``, the code they share beside it."""
