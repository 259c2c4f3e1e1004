"""TransferLab terminal UI."""
