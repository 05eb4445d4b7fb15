"""Using a trained model: one ``Predictor`` for every model file (:mod:`.inference`), the
``predict`` command (:mod:`.predict`), exports (:mod:`.export`) and the HTTP service with its
web page (:mod:`.serve`, ``static/``). Imports no training or evaluation code (a test asserts
it)."""
