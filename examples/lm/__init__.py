"""The language-model example's pieces: ``data`` (byte-level corpus, split, batches), ``model``
(Llama-style decoder built from qjax layers), ``train`` (loop, optimizer, checkpoints) and
``report`` (table, CSV, plot). The entry point is ``examples/train_lm.py``."""
