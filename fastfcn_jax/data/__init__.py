"""Input data: dataset registry (``datasets``), tfds builders (``builders/``), joint image+mask transforms
(``transforms``), host pipelines (``pipeline``) and the ``prepare`` CLI. TensorFlow stays inside this package."""
