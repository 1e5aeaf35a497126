"""Glue for the frameworks people train with; each submodule imports its framework lazily.

* :mod:`effsam.integrations.lightning` — ``SharpnessAwareCallback``, the fp16
  ``SharpnessAwarePrecision`` plugin, ``manual_step`` for manual optimisation;
* :mod:`effsam.integrations.transformers` — ``SharpnessAwareTrainer``;
* :mod:`effsam.integrations.timm` — ``register()`` for timm's optimizer factory and
  ``train_step`` for timm-style loops;
* :mod:`effsam.integrations.accelerate` — ``sharpness_aware_step`` for an accelerate loop.

What is supported and what is refused, with the test behind each cell:
docs/integrations.md.
"""
