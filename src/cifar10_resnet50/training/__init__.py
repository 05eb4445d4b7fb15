"""Training: the loop (:mod:`.train`), time budgets (:mod:`.budget`), the cached linear probe
(:mod:`.probe`), the learning-rate range test (:mod:`.lr_find`) and TensorBoard logging
(:mod:`.board`). Nothing outside this package imports it except ``api``/``cli``."""
