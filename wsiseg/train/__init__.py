"""Training the PDAM model: the trainer and its negative (glass) crops."""
