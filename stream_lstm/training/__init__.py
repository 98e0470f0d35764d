"""Training: TBPTT, the promotion gate, background retraining and the offline `train` command."""
