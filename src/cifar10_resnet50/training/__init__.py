"""Training. The command (:mod:`.train`) builds a run (:mod:`.trainer`) and drives the loop
(:mod:`.loop`: epochs of steps, with :mod:`.callbacks` as its seam) or the cached linear probe
(:mod:`.probe`); the step, the batches and the optimizer come from one core (:mod:`.core`),
which the learning-rate range test (:mod:`.lr_find`) and the budget's timing
(:mod:`.planning`, arithmetic in :mod:`.budget`) share. Also :mod:`.compile_policy`
(``--compile``), :mod:`.metrics` (``metrics.jsonl``) and :mod:`.board` (TensorBoard).
Nothing outside this package imports it except ``api``/``cli``."""
