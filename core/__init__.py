"""TransferLab engine."""
