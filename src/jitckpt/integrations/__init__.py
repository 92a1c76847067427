"""JIT checkpointing for the frameworks people train with, through their own
extension points: a Hugging Face ``TrainerCallback``
(jitckpt.integrations.huggingface), a PyTorch Lightning ``Callback``
(jitckpt.integrations.lightning) and torchtitan's Trainer, hooked by
``attach(trainer)`` (jitckpt.integrations.torchtitan).

Each one makes a :class:`~jitckpt.checkpoint.jit_checkpoint.JitCheckpoint`
at the start of training, marks a step boundary at the framework's step-end
hook (after its optimizer and scheduler steps), and, when a failure makes
the survivors save, writes the saved state in the framework's own
checkpoint layout too (``JitCheckpoint(on_saved=...)``), so that the
framework's own resume finds it; the framework restores it, not jitckpt
(``JitCheckpoint(resumed_by_framework=...)``).

What it may import: the public JitCheckpoint and what it is made of
(jitckpt.checkpoint, jitckpt.state), jitckpt.storage.directory (its fsync
of a directory), the vocabulary, and the framework itself, which is
imported only here (the frameworks are optional extras, never needed by the
core: ``pip install 'jitckpt[huggingface]'``).
"""
