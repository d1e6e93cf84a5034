"""Training transcoders: text sources, activation stores, the trainer (one process or many), evaluation."""
